# Sourced by the scripts whose files travel over several calls (at most 64 MiB each), with
# $stash set: copies every file .device/ holds into $stash, where a warm machine keeps
# them between calls. With STAGE=1 that is the whole call: it lists $stash and exits.
mkdir -p "$stash"
for f in .device/*; do
    if [ -f "$f" ]; then cp "$f" "$stash/"; fi
done
if [ -n "${STAGE:-}" ]; then
    ls -la "$stash"
    exit 0
fi
