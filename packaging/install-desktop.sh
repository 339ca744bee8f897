#!/bin/sh
# Add QLoRA Studio to the current user's application menu (freedesktop: GNOME, KDE, Xfce, ...).
#
#   ./install-desktop.sh                  install (or update) the menu entry and icons
#   ./install-desktop.sh --exec PATH      ... launching PATH instead of the one found below
#   ./install-desktop.sh --uninstall      remove them again
#
# Which program the menu entry starts: with --exec, that one; else the frozen app when this
# script sits beside it (the unpacked tarball: qlora-studio/install-desktop.sh); else the
# qlora-studio command of a pip install, found on PATH. Writes only under $XDG_DATA_HOME
# (default ~/.local/share): applications/qlora-studio.desktop and
# icons/hicolor/<size>/apps/qlora-studio.{png,svg}. No root needed.
set -eu

HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${XDG_DATA_HOME:-$HOME/.local/share}"
APPS="$DATA/applications"
ICONS="$DATA/icons/hicolor"
NAME=qlora-studio
ICON_SRC="$HERE/icons/hicolor"

refresh() {
    # Optional caches; desktops rescan the folders without them. The icon cache is refreshed
    # only where one exists already: a new cache in the user's folder goes stale the moment
    # another program adds an icon without refreshing it.
    if command -v update-desktop-database >/dev/null 2>&1; then
        update-desktop-database -q "$APPS" 2>/dev/null || true
    fi
    if [ -f "$ICONS/icon-theme.cache" ] && command -v gtk-update-icon-cache >/dev/null 2>&1; then
        gtk-update-icon-cache -q -t "$ICONS" 2>/dev/null || true
    fi
}

EXEC=""
case "${1:-}" in
    --uninstall)
        rm -f "$APPS/$NAME.desktop"
        for f in "$ICONS"/*/apps/"$NAME".png "$ICONS"/*/apps/"$NAME".svg; do
            [ -e "$f" ] && rm -f "$f"
        done
        refresh
        echo "removed QLoRA Studio's menu entry and icons from $DATA"
        exit 0
        ;;
    --exec)
        [ $# -ge 2 ] || { echo "usage: $0 [--exec PATH | --uninstall]" >&2; exit 2; }
        EXEC="$2"
        ;;
    "") ;;
    -h|--help)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--exec PATH | --uninstall]" >&2
        exit 2
        ;;
esac

if [ -z "$EXEC" ]; then
    if [ -x "$HERE/$NAME" ] && [ -f "$HERE/$NAME" ]; then
        EXEC="$HERE/$NAME"
    elif command -v "$NAME" >/dev/null 2>&1; then
        EXEC="$(command -v "$NAME")"
    else
        echo "error: no $NAME program found beside this script or on PATH" >&2
        echo "hint: pip install qlora-studio, or unpack the tarball and run its install-desktop.sh, or pass --exec PATH" >&2
        exit 1
    fi
fi
[ -x "$EXEC" ] || { echo "error: $EXEC is not an executable file" >&2; exit 1; }
[ -d "$ICON_SRC" ] || { echo "error: no icons at $ICON_SRC" >&2; exit 1; }

# The Desktop Entry spec: an argument with a space or a special character is double-quoted,
# and inside the quotes ", `, $ and \ are escaped with a backslash.
case "$EXEC" in
    *[\ \"\`\$\\\'\>\<\~\|\&\;\*\?\#\(\)]*)
        QUOTED="\"$(printf '%s' "$EXEC" | sed 's/\([\\"`$]\)/\\\1/g')\""
        # a backslash is also the general escape of a desktop file's string values
        QUOTED="$(printf '%s' "$QUOTED" | sed 's/\\/\\\\/g')"
        ;;
    *) QUOTED="$EXEC" ;;
esac
QUOTED="$(printf '%s' "$QUOTED" | sed 's/%/%%/g')"  # a literal % in Exec is written %%

mkdir -p "$APPS"
tmp="$APPS/.$NAME.desktop.tmp"
# Exec and TryExec name the program found above; everything else as shipped.
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        Exec=*) printf 'Exec=%s %%f\n' "$QUOTED" ;;
        TryExec=*) printf 'TryExec=%s\n' "$EXEC" ;;
        *) printf '%s\n' "$line" ;;
    esac
done < "$HERE/$NAME.desktop" > "$tmp"
mv "$tmp" "$APPS/$NAME.desktop"

count=0
for dir in "$ICON_SRC"/*/apps; do
    size="$(basename "$(dirname "$dir")")"
    mkdir -p "$ICONS/$size/apps"
    for f in "$dir/$NAME".png "$dir/$NAME".svg; do
        if [ -f "$f" ]; then
            cp "$f" "$ICONS/$size/apps/"
            count=$((count + 1))
        fi
    done
done
refresh
echo "installed $APPS/$NAME.desktop (runs $EXEC) and $count icons under $ICONS"
