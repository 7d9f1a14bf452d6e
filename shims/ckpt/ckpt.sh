# shellcheck shell=bash
# ckpt.sh: the shell side of `import ckpt`, for bash scripts run by `ckpt run`.
#
#   source "$(ckpt shell-shim --path)"       # installed: the file ships with ckpt
#   source "$("$CKPT_BIN" shell-shim --path)"  # the same, with the supervisor's own ckpt
#   source /path/to/this/ckpt.sh             # from a checkout of ckpt
#
# Functions (every one is `set -euo pipefail` safe; warnings go to stderr):
#
#   ckpt_dir                  the checkpoint directory: $CKPT_DIR, or ./checkpoints
#                             (of the directory the shim was sourced in)
#   ckpt_attempt              1 on the first launch, +1 on every relaunch
#   ckpt_restored             prints the restored snapshot id; status 1 on a fresh start
#   ckpt_prev_exists          status 0 if the directory holds anything but temp files
#   ckpt_save SRC [NAME]      copy file SRC in as NAME (default: its basename),
#                             atomically (temp name + rename), then ckpt_commit
#   ckpt_write                stdin -> the payload file, atomically, then ckpt_commit
#                             (`producer | ckpt_write` cannot see the producer fail:
#                             `producer >f && ckpt_save f payload` can)
#   ckpt_read                 the payload file -> stdout; status 1 if there is none
#   ckpt_commit [--no-wait]   `ckpt commit`: snapshot the directory as it is now and
#                             wait until it is durable (--no-wait: until it is pinned);
#                             the status of `ckpt commit` (69: not durable). Outside
#                             `ckpt run`: status 0, nothing else to do
#   ckpt_preemption_requested status 0 once the checkpoint signal arrived: save soon
#   ckpt_on_preemption CMD    also run CMD (eval'd, keep it short) when it arrives
#   ckpt_retry [MESSAGE]      exit 75: `ckpt run` relaunches the script, which resumes
#
# The payload file is the one ckpt.checkpoint().read()/.write() use in Python.
#
# Sourcing installs a trap for the checkpoint signal ($CKPT_CHECKPOINT_SIGNAL,
# default SIGUSR1; a trap set before is still run) and tells the supervisor that
# this shell handles it: `ckpt signal` is sent only to processes that asked
# for it (the default action of SIGUSR1 kills). Bash runs a trap only between commands: a long
# foreground command delays it; `cmd & wait $!` does not (wait then returns
# 128+signal, fatal under `set -e`: `wait $! || wait $!` gets cmd's own status).
# Source it in the main shell of the script, not in a subshell or a $(...).
#
# Sourced outside `ckpt run` (no $CKPT_SOCKET), it warns once and every
# function works on the local directory: the script runs the same, unprotected.
#
# Needs bash >= 4 and coreutils. Telling the supervisor needs a Python 3 with
# its standard library: the one that runs `ckpt` ($CKPT_BIN), else python3.

if [[ "${BASH_SOURCE[0]:-}" == "${0:-}" ]]; then
    printf 'ckpt.sh is sourced, not run: source %s\n' "$0" >&2
    exit 2
fi

# Resolved once, so a later `cd` does not move the fallback directory.
_CKPT_FALLBACK_DIR="${PWD}/checkpoints"
_CKPT_PREEMPTED=${_CKPT_PREEMPTED:-0}
_CKPT_CALLBACKS=${_CKPT_CALLBACKS:-}
_CKPT_PREV_TRAP=${_CKPT_PREV_TRAP:-}
_CKPT_WARNED=${_CKPT_WARNED:-}

_ckpt_warn_once() { # KEY MESSAGE
    case " ${_CKPT_WARNED} " in
    *" $1 "*) return 0 ;;
    esac
    _CKPT_WARNED="${_CKPT_WARNED} $1"
    printf 'ckpt: warning: %s\n' "$2" >&2
}

_ckpt_error() {
    printf 'ckpt: error: %s\n' "$1" >&2
}

# Sets _ckpt_d, the checkpoint directory.
_ckpt_resolve_dir() {
    _ckpt_d=${CKPT_DIR:-$_CKPT_FALLBACK_DIR}
}

# The names ckpt never snapshots (ckpt._contract.TEMP_PATTERNS).
_ckpt_is_temp() {
    case $1 in
    *.tmp | *.tmp.* | *.temp | *.partial | *.part | *.swp | *~ | .#* | \
        *.orbax-checkpoint-tmp-* | *.orbax-checkpoint-tmp | tmp-checkpoint-* | .ckpt-* | \
        .*.ckpt-restore-*)
        return 0
        ;;
    esac
    return 1
}

ckpt_dir() {
    local _ckpt_d
    _ckpt_resolve_dir
    printf '%s\n' "$_ckpt_d"
}

ckpt_attempt() {
    if [[ "${CKPT_ATTEMPT:-}" =~ ^[0-9]+$ ]]; then
        printf '%s\n' "$CKPT_ATTEMPT"
    else
        printf '1\n'
    fi
}

ckpt_restored() {
    [[ -n "${CKPT_RESTORED:-}" ]] || return 1
    printf '%s\n' "$CKPT_RESTORED"
}

ckpt_prev_exists() {
    local _ckpt_d f found=1 restore_glob
    _ckpt_resolve_dir
    [[ -d "$_ckpt_d" ]] || return 1
    # The caller's glob settings must not change what is found (nor be changed).
    restore_glob=$(shopt -p nullglob failglob || true)
    [[ $- == *f* ]] && restore_glob+=$'\nset -f'
    set +f
    shopt -s nullglob
    shopt -u failglob
    for f in "$_ckpt_d"/* "$_ckpt_d"/.[!.]* "$_ckpt_d"/..?*; do
        if ! _ckpt_is_temp "${f##*/}"; then
            found=0
            break
        fi
    done
    eval "$restore_glob"
    return "$found"
}

ckpt_commit() {
    [[ -n "${CKPT_SOCKET:-}" ]] || return 0 # not under `ckpt run`: warned when sourced
    "${CKPT_BIN:-ckpt}" commit "$@"
}

# A new file beside $1, to be renamed over it: created by mktemp (a name no
# one can guess, never an existing file or a link), with $1's permission
# bits when $1 exists (special bits dropped), else the umask's default; so
# an atomic rewrite never makes a private file readable by others. Prints
# its path.
_ckpt_temp_beside() {
    local target=$1 tmp mode
    tmp=$(mktemp "${target%/*}/.${target##*/}.tmp.XXXXXXXX") || return 1
    if [[ -f "$target" && ! -L "$target" ]]; then
        mode=$(stat -c %a -- "$target") && mode=$(printf '%o' $((8#$mode & 8#777)))
    else
        mode=$(printf '%o' $((8#666 & ~8#$(umask))))
    fi
    if ! chmod -- "$mode" "$tmp"; then
        rm -f -- "$tmp"
        return 1
    fi
    printf '%s\n' "$tmp"
}

ckpt_save() {
    if [[ $# -lt 1 || $# -gt 2 ]]; then
        _ckpt_error "usage: ckpt_save SRC [NAME]"
        return 2
    fi
    local src=$1 name=${2:-${1##*/}} _ckpt_d target tmp
    if [[ ! -f "$src" ]]; then
        _ckpt_error "ckpt_save: nothing to save at $src (a file is needed)"
        return 1
    fi
    case "/$name/" in
    // | //* | */../* | */./* | *//*)
        _ckpt_error "ckpt_save: $name is not a relative name inside the checkpoint directory"
        return 2
        ;;
    esac
    if _ckpt_is_temp "${name##*/}"; then
        _ckpt_error "ckpt_save: $name is a temp name, which is never snapshotted"
        return 2
    fi
    _ckpt_resolve_dir
    target="$_ckpt_d/$name"
    mkdir -p -- "${target%/*}" || return 1
    tmp=$(_ckpt_temp_beside "$target") || return 1
    if ! cp -- "$src" "$tmp" || ! mv -fT -- "$tmp" "$target"; then
        rm -f -- "$tmp"
        return 1
    fi
    ckpt_commit
}

ckpt_write() {
    local _ckpt_d tmp
    _ckpt_resolve_dir
    mkdir -p -- "$_ckpt_d" || return 1
    tmp=$(_ckpt_temp_beside "$_ckpt_d/payload") || return 1
    if ! cat >"$tmp" || ! mv -fT -- "$tmp" "$_ckpt_d/payload"; then
        rm -f -- "$tmp"
        return 1
    fi
    ckpt_commit
}

ckpt_read() {
    local _ckpt_d
    _ckpt_resolve_dir
    [[ -f "$_ckpt_d/payload" ]] || return 1
    cat -- "$_ckpt_d/payload"
}

ckpt_preemption_requested() {
    [[ "$_CKPT_PREEMPTED" == 1 ]]
}

ckpt_on_preemption() {
    if [[ $# -ne 1 || -z "$1" ]]; then
        _ckpt_error "usage: ckpt_on_preemption COMMAND"
        return 2
    fi
    _CKPT_CALLBACKS+="$1"$'\n'
}

ckpt_retry() {
    [[ $# -eq 0 ]] || printf '%s\n' "$*" >&2
    exit 75
}

# ---------------------------------------------------------------- the checkpoint signal

_ckpt_on_signal() {
    _CKPT_PREEMPTED=1
    if [[ -n "$_CKPT_CALLBACKS" ]]; then
        eval "$_CKPT_CALLBACKS"
    fi
    if [[ -n "$_CKPT_PREV_TRAP" ]]; then
        eval "$_CKPT_PREV_TRAP"
    fi
}

# The Python that runs `ckpt` (from the #! line of $CKPT_BIN), else python3.
_ckpt_python() {
    local line="" interp=""
    local -a words=()
    if [[ -n "${CKPT_BIN:-}" && -f "$CKPT_BIN" ]]; then
        IFS= read -r line <"$CKPT_BIN" 2>/dev/null || true
        if [[ "$line" == '#!'* ]]; then
            read -r -a words <<<"${line#??}"
            if [[ ${#words[@]} -gt 0 ]]; then
                interp=${words[0]}
                if [[ "${interp##*/}" == env && ${#words[@]} -gt 1 ]]; then
                    interp=${words[1]}
                fi
                if [[ "${interp##*/}" == python* ]] && command -v "$interp" >/dev/null 2>&1; then
                    printf '%s\n' "$interp"
                    return 0
                fi
            fi
        fi
    fi
    command -v python3 2>/dev/null || command -v python 2>/dev/null
}

# {"op": "hello", "pid": PID, "signal": NAME} on the control socket, as `import ckpt` does.
_CKPT_HELLO='import json, os, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect(os.environ["CKPT_SOCKET"])
    s.sendall(json.dumps({"op": "hello", "pid": int(sys.argv[1]), "signal": sys.argv[2]}).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        more = s.recv(65536)
        if not more:
            break
        data += more
reply = json.loads(data or b"{}")
if not reply.get("ok"):
    sys.exit(str(reply.get("error") or "no reply"))'

_ckpt_install() {
    local sig=${CKPT_CHECKPOINT_SIGNAL:-SIGUSR1} prev py
    local -a words=()
    sig=${sig^^}
    sig=${sig#SIG}
    if ! trap -p "$sig" >/dev/null 2>&1; then
        _ckpt_warn_once signal "unknown checkpoint signal ${CKPT_CHECKPOINT_SIGNAL:-}: using SIGUSR1"
        sig=USR1
    fi
    prev=$(trap -p "$sig")
    if [[ -n "$prev" ]]; then
        eval "words=($prev)" # trap -- 'COMMAND' SIGNAME
        if [[ "${words[2]:-}" != _ckpt_on_signal ]]; then
            _CKPT_PREV_TRAP=${words[2]:-}
        fi
    fi
    trap _ckpt_on_signal "$sig"
    if [[ -z "${CKPT_SOCKET:-}" ]]; then
        # Warned here, once: a function run in a pipeline or $(...) is a
        # subshell, which could not remember that it had warned already.
        local where=""
        [[ -n "${CKPT_DIR:-}" ]] || where=", checkpoints go to ${_CKPT_FALLBACK_DIR}"
        _ckpt_warn_once outside "not running under \`ckpt run\`: ckpt_commit only saves locally${where}; no remote copy and no retries"
        return 0
    fi
    if ! py=$(_ckpt_python) || [[ -z "$py" ]]; then
        _ckpt_warn_once hello "no python3 to tell the supervisor this script handles SIG$sig: \`ckpt signal\` will not reach it"
        return 0
    fi
    if ! "$py" -I -S -c "$_CKPT_HELLO" "${BASHPID:-$$}" "SIG$sig"; then
        _ckpt_warn_once hello "could not tell the supervisor this script handles SIG$sig: \`ckpt signal\` will not reach it"
    fi
    return 0
}

_ckpt_install
