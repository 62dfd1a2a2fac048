#!/usr/bin/env bash
# Peak memory and time of `zhllama export` (docs/PERF.md): runs the export given as arguments and
# samples /proc every 50 ms for the largest anonymous (RssAnon: the tensors we hold) and file-backed
# (RssFile: mapped checkpoint pages) resident sizes; GNU time gives wall time and peak RSS.
# Usage: tools/export_rss.sh target/release/zhllama export --model DIR --tokenizer T --output F --outtype q8_0
set -euo pipefail
log="$(mktemp)"
/usr/bin/time -f "%e s wall, %M KiB peak RSS" "$@" >/dev/null 2>"$log" &
pid=$!
sleep 0.1
child="$(pgrep -P "$pid" | head -1)"
anon=0 file=0
while kill -0 "$child" 2>/dev/null; do
    read -r a f < <(awk '/RssAnon/{a=$2} /RssFile/{f=$2} END{print a+0, f+0}' "/proc/$child/status" 2>/dev/null || echo "0 0")
    [ "$a" -gt "$anon" ] && anon=$a
    [ "$f" -gt "$file" ] && file=$f
    sleep 0.05
done
wait "$pid"
echo "$(tail -1 "$log"); max RssAnon $anon KiB, max RssFile $file KiB"
rm -f "$log"
