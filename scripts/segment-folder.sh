#!/usr/bin/env bash
# Segment every TIFF in a folder through the unet-tile HTTP service, several at a time.
#
#   scripts/segment-folder.sh [-u URL] [-j JOBS] [-r RETRIES] [-q QUERY] INPUT_DIR OUTPUT_DIR
#
#   -u URL      service address (default http://127.0.0.1:8000)
#   -j JOBS     requests in flight at once (default 4)
#   -r RETRIES  retries of a busy (503) or unreachable server per file, honouring Retry-After (default 5)
#   -q QUERY    query options, e.g. 'output=probabilities&tile_size=644'
#
# Each mask is written as OUTPUT_DIR/<input name>, atomically (a .part file renamed on success).
# UNET_API_KEY, if set, is sent as 'Authorization: Bearer <key>' (not on the command line).
# Prints one line per file; failures (with the server's message) go to stderr and are listed
# at the end; the exit status is 1 if any file failed, 2 on bad usage.
set -euo pipefail

url=http://127.0.0.1:8000
jobs=4
retries=5
query=
usage() { sed -n '3,9s/^# \{0,1\}//p' "$0" >&2; exit 2; }
while getopts "u:j:r:q:h" opt; do
    case $opt in
        u) url=${OPTARG%/} ;;
        j) jobs=$OPTARG ;;
        r) retries=$OPTARG ;;
        q) query=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[[ $# -eq 2 ]] || usage
in_dir=$1
out_dir=$2
[[ -d $in_dir ]] || { echo "segment-folder: not a directory: $in_dir" >&2; exit 2; }
[[ $jobs =~ ^[1-9][0-9]*$ && $retries =~ ^[0-9]+$ ]] || usage
command -v curl >/dev/null || { echo "segment-folder: curl is required" >&2; exit 2; }
mkdir -p "$out_dir"
failures=$(mktemp)
auth_file=$(mktemp) # the key goes to curl in a file, never on a command line
trap 'rm -f "$failures" "$auth_file"' EXIT
[[ -z ${UNET_API_KEY:-} ]] || printf 'Authorization: Bearer %s\n' "$UNET_API_KEY" >"$auth_file"

segment_one() {
    local src=$1 name tmp hdr code attempt=0 wait detail
    local -a auth=()
    name=$(basename "$src")
    tmp=$(mktemp "$out_dir/.$name.XXXXXX.part")
    hdr=$(mktemp)
    if [[ -n ${UNET_API_KEY:-} ]]; then
        auth=(-H "@$auth_file")
    fi
    while :; do
        code=$(curl -sS -o "$tmp" -D "$hdr" -w '%{http_code}' "${auth[@]}" \
            -H 'Content-Type: image/tiff' --data-binary @"$src" "$url/segment${query:+?$query}" 2>/dev/null) || code=000
        if [[ $code == 200 ]]; then
            mv "$tmp" "$out_dir/$name"
            rm -f "$hdr"
            echo "ok    $name"
            return 0
        fi
        if [[ ($code == 503 || $code == 000) && $attempt -lt $retries ]]; then
            wait=$(tr -d '\r' <"$hdr" | awk 'tolower($1) == "retry-after:" {print $2}')
            [[ $wait =~ ^[0-9]+$ ]] || wait=$((2 ** attempt))
            attempt=$((attempt + 1))
            echo "retry $name: HTTP $code, retrying in ${wait}s ($attempt/$retries)" >&2
            sleep "$wait"
            continue
        fi
        detail=$(head -c 300 "$tmp" 2>/dev/null | tr -d '\n')
        [[ $code == 000 ]] && detail="server unreachable at $url"
        echo "FAIL  $name: HTTP $code $detail" >&2
        echo "$name: HTTP $code $detail" >>"$failures"
        rm -f "$tmp" "$hdr"
        return 1
    done
}
export -f segment_one
export url retries query out_dir failures auth_file

total=$(find "$in_dir" -maxdepth 1 -type f \( -iname '*.tif' -o -iname '*.tiff' \) | wc -l)
find "$in_dir" -maxdepth 1 -type f \( -iname '*.tif' -o -iname '*.tiff' \) -print0 |
    xargs -0 -r -n 1 -P "$jobs" bash -c 'segment_one "$1"' _ || true
failed=$(wc -l <"$failures")
if [[ $failed -gt 0 ]]; then
    echo "segment-folder: $failed of $total file(s) failed:" >&2
    cat "$failures" >&2
    exit 1
fi
echo "segment-folder: all $total file(s) segmented into $out_dir"
