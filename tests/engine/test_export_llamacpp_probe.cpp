// A probe of our GGUF exports through llama.cpp itself (used by test_export_llamacpp.py).
//
//   probe MODEL.gguf [--lora LORA.gguf] (--ids 1,2,3 | --text "...")
//
// Loads the model (and the LoRA adapter file, at scale 1) on the CPU, tokenizes the text the way
// llama.cpp does (or takes the token ids as given), runs one forward pass, and prints one JSON
// object: the tokens, the logits of the last position, the architecture and the chat template.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static std::string json_str(const char * s) {
    std::string out = "\"";
    for (const char * p = s; p && *p; ++p) {
        unsigned char c = (unsigned char) *p;
        if (c == '"' || c == '\\') { out += '\\'; out += (char) c; }
        else if (c == '\n') out += "\\n";
        else if (c < 0x20) { char buf[8]; snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
        else out += (char) c;
    }
    return out + "\"";
}

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: probe MODEL [--lora FILE] (--ids 1,2 | --text T)\n"); return 2; }
    const char * model_path = argv[1];
    const char * lora_path = nullptr;
    std::string ids_arg, text;
    bool have_text = false;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--lora")) lora_path = argv[i + 1];
        else if (!strcmp(argv[i], "--ids")) ids_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--text")) { text = argv[i + 1]; have_text = true; }
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "llama.cpp could not load %s\n", model_path); return 3; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "no context\n"); return 4; }
    if (lora_path) {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, lora_path);
        if (!lora) { fprintf(stderr, "llama.cpp could not load the LoRA %s\n", lora_path); return 5; }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) { fprintf(stderr, "could not apply the LoRA\n"); return 6; }
    }
    std::vector<llama_token> tokens;
    if (have_text) {
        tokens.resize(text.size() + 16);
        int n = llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), true, true);
        if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 7; }
        tokens.resize(n);
    } else {
        for (char * tok = strtok(ids_arg.data(), ","); tok; tok = strtok(nullptr, ",")) tokens.push_back(atoi(tok));
    }
    if (llama_decode(ctx, llama_batch_get_one(tokens.data(), (int32_t) tokens.size())) != 0) {
        fprintf(stderr, "decode failed\n");
        return 8;
    }
    const float * logits = llama_get_logits_ith(ctx, -1);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    char arch[128] = {0};
    llama_model_meta_val_str(model, "general.architecture", arch, sizeof arch);
    printf("{\"arch\": %s, \"chat_template\": %s, \"eos\": %d, \"tokens\": [", json_str(arch).c_str(),
           json_str(llama_model_chat_template(model, nullptr)).c_str(), llama_vocab_eos(vocab));
    for (size_t i = 0; i < tokens.size(); ++i) printf(i ? ", %d" : "%d", tokens[i]);
    printf("], \"logits\": [");
    for (int i = 0; i < n_vocab; ++i) printf(i ? ", %.7g" : "%.7g", logits[i]);
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
