"""A probe of our GGUF files through llama.cpp itself, by its C API (llama-cpp-python's ctypes binding).

    python llamacpp_probe.py MODEL.gguf [--lora LORA.gguf] (--ids 1,2,3 | --text "...") [--generate N]

Loads the model on the CPU (and the LoRA adapter file, at scale 1), tokenizes the text the way
llama.cpp does (or takes the token ids as given), runs one forward pass and prints one JSON
object: the tokens, the logits of the last position, the architecture, the chat template and EOS.
With ``--generate N`` it goes on greedily for up to N tokens (stopping at end of generation) and
adds the new tokens and their text. It runs as its own process so llama.cpp's logging and any
native crash stay out of the test process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys

import llama_cpp as C

GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


@C.llama_log_callback
def _quiet(level, text, _user):  # only errors reach stderr
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--lora")
    p.add_argument("--ids")
    p.add_argument("--text")
    p.add_argument("--generate", type=int, default=0)
    args = p.parse_args(argv)
    C.llama_log_set(_quiet, ctypes.c_void_p())
    C.llama_backend_init()
    mp = C.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = C.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        print(f"llama.cpp could not load {args.model}", file=sys.stderr)
        return 3
    vocab = C.llama_model_get_vocab(model)
    cp = C.llama_context_default_params()
    cp.n_ctx = cp.n_batch = 512
    ctx = C.llama_init_from_model(model, cp)
    if args.lora:
        lora = C.llama_adapter_lora_init(model, args.lora.encode())
        if not lora:
            print(f"llama.cpp could not load the LoRA {args.lora}", file=sys.stderr)
            return 5
        adapters = (C.llama_adapter_lora_p_ctypes * 1)(lora)
        if C.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
            print("could not apply the LoRA", file=sys.stderr)
            return 6
    if args.text is not None:
        raw = args.text.encode()
        buf = (C.llama_token * (len(raw) + 16))()
        n = C.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
        tokens = list(buf[:n])
    else:
        tokens = [int(t) for t in args.ids.split(",")]
    n_vocab = C.llama_vocab_n_tokens(vocab)

    def decode(ids: list[int]) -> list[float]:
        arr = (C.llama_token * len(ids))(*ids)
        if C.llama_decode(ctx, C.llama_batch_get_one(arr, len(ids))) != 0:
            raise SystemExit("decode failed")
        return C.llama_get_logits_ith(ctx, -1)[:n_vocab]

    logits = decode(tokens)
    out = {"tokens": tokens, "logits": logits}
    if args.generate:
        new, text = [], b""
        piece = ctypes.create_string_buffer(256)
        last = logits
        for _ in range(args.generate):
            tok = max(range(n_vocab), key=last.__getitem__)
            if C.llama_vocab_is_eog(vocab, tok):
                break
            new.append(tok)
            n = C.llama_token_to_piece(vocab, tok, piece, len(piece), 0, False)
            text += piece.raw[: max(n, 0)]
            last = decode([tok])
        out.update(generated=new, generated_text=text.decode("utf-8", "replace"))
    arch = ctypes.create_string_buffer(128)
    C.llama_model_meta_val_str(model, b"general.architecture", arch, len(arch))
    template = C.llama_model_chat_template(model, None)
    out.update(
        arch=arch.value.decode(),
        chat_template=template.decode() if template else None,
        eos=C.llama_vocab_eos(vocab),
    )
    print(json.dumps(out))
    C.llama_free(ctx)
    C.llama_model_free(model)
    C.llama_backend_free()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
