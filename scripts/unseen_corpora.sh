#!/usr/bin/env bash
# Long documents of kinds demo-base never saw, for checks of generality (README): Perl
# modules with their POD documentation (/usr/share/perl) and C headers (/usr/include).
# Each corpus takes 20 files of >= 16 KB, every k-th by path, chosen before any
# evaluation; the files chosen are listed in OUT_DIR/NAME.files. Every document is in the
# test split. Usage: bash scripts/unseen_corpora.sh OUT_DIR  (writes OUT_DIR/corpus-perl
# and OUT_DIR/corpus-cheaders)
set -euo pipefail
out=${1:?usage: unseen_corpora.sh OUT_DIR}
mkdir -p "$out"
pick() {  # $1 name, $2 source dir, $3 glob
    local dir="$out/src-$1"
    rm -rf "$dir" && mkdir -p "$dir"
    find "$2" -name "$3" -size +16k -type f | sort > "$out/$1.all"
    local n; n=$(wc -l < "$out/$1.all")
    awk -v n="$n" 'NR % int(n / 20) == 0 && c < 20 { c++; print }' "$out/$1.all" > "$out/$1.files"
    local i=0
    while read -r f; do i=$((i + 1)); cp "$f" "$dir/$(printf %02d $i).txt"; done < "$out/$1.files"
    memformers data build --source "$dir" --split 0,0,1 --out "$out/corpus-$1" --overwrite --quiet
}
pick perl /usr/share/perl '*.pm'
pick cheaders /usr/include '*.h'
