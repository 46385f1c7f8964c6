#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host to build, test and run the balancer. Idempotent: every step
# checks first and skips what is already done, so a second run takes a few seconds.
# Run as root from anywhere; it works on the repository this script lives in.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP_DIR="$VENV/.setup"
KVER="$(uname -r)"
# etcd-server: the fleet's shared state; bird2: each LB host's BGP speaker and the lab's
# router (tests and the lab start their own instances). clang, libbpf-dev and bpftool: the
# chain tests build and load the example filter (xdp/examples/drop_source.c) the way
# docs/chain.md tells an operator to. systemd: `systemd-analyze verify` of the units
# (tests/install; container images lack it). python3-venv: `lbctl install` makes its venv with
# /usr/bin/python3. setpriv and nsenter (the unit's user and capabilities in the tests) are
# util-linux, which is Essential on Debian.
APT_PKGS=(bpfcc-tools python3-bpfcc libbpfcc netsniff-ng iproute2 ethtool tcpdump libatomic1
          etcd-server bird2 clang libbpf-dev bpftool systemd python3-venv)

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
skip() { printf '    %s (already done)\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# --- preconditions ---------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (BPF, XDP and network namespaces need it): sudo $0"
[ -r /etc/os-release ] || die "no /etc/os-release: only Debian and Ubuntu-like systems are supported"
# shellcheck disable=SC1091
. /etc/os-release
case " ${ID:-} ${ID_LIKE:-} " in
  *" debian "*|*" ubuntu "*) ;;
  *) die "this is '${PRETTY_NAME:-unknown}', not Debian/Ubuntu-like; install BCC (python3-bpfcc), kernel headers, netsniff-ng, iproute2, ethtool and tcpdump by hand" ;;
esac
[ -e /sys/kernel/btf/vmlinux ] || echo "setup: warning: /sys/kernel/btf/vmlinux is missing: this kernel has no BTF" >&2

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# --- apt packages ----------------------------------------------------------------------------
step "apt packages: ${APT_PKGS[*]}"
missing=()
for p in "${APT_PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then skip "all installed"; else
  echo "    installing: ${missing[*]}"
  apt_install "${missing[@]}"
fi

# --- kernel headers (BCC compiles against /lib/modules/$KVER/build) ---------------------------
step "kernel headers for $KVER"
if [ -e "/lib/modules/$KVER/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$KVER/build/Makefile" ]; then
  skip "/lib/modules/$KVER/build exists"
else
  [ "$apt_updated" -eq 1 ] || { DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; }
  if apt-cache show "linux-headers-$KVER" >/dev/null 2>&1; then
    echo "    the distribution has headers for this kernel: linux-headers-$KVER"
    apt_install "linux-headers-$KVER"
  else
    # Fallback for kernels the distribution does not package (see PLATFORM.md): the generic
    # headers carry the stable UAPI structs an XDP program uses. Debian splits them into an
    # arch tree and a common tree, so both links are needed; BCC_KERNEL_SOURCE alone fails.
    arch="$(dpkg --print-architecture)"
    echo "    no linux-headers-$KVER in the archive; falling back to linux-headers-$arch"
    is_installed "linux-headers-$arch" || apt_install "linux-headers-$arch"
    build="$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$build" ] || die "linux-headers-$arch installed no /usr/src/linux-headers-*-$arch tree"
    common="${build%-"$arch"}-common"
    [ -d "$common" ] || die "expected $common next to $build"
    mkdir -p "/lib/modules/$KVER"
    ln -sfn "$build" "/lib/modules/$KVER/build"
    ln -sfn "$common" "/lib/modules/$KVER/source"
    echo "    linked /lib/modules/$KVER/build -> $build, source -> $common"
  fi
fi

# --- bpffs -----------------------------------------------------------------------------------
step "bpffs at /sys/fs/bpf"
if mountpoint -q /sys/fs/bpf; then skip "mounted"; else
  mount -t bpf bpf /sys/fs/bpf
  echo "    mounted"
fi

# --- virtualenv ------------------------------------------------------------------------------
step "virtualenv $VENV"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PY is $("$PY" --version 2>&1); Python 3.11 or newer is required (set PYTHON=...)"
if [ -x "$VENV/bin/python" ]; then skip "exists"; else
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian's own python3 ships venv/ensurepip separately.
    rm -rf "$VENV"
    apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi

# BCC's Python module is pure Python over libbcc (ctypes) and comes only from Debian. Expose
# that one package to the venv, not the whole of dist-packages.
step "BCC's Python module visible in the venv"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
bcc_src=/usr/lib/python3/dist-packages/bcc
[ -d "$bcc_src" ] || die "$bcc_src is missing: is python3-bpfcc installed?"
if [ -L "$VENV/bcc-only/bcc" ] && [ -f "$site/debian-bcc.pth" ]; then skip "linked"; else
  mkdir -p "$VENV/bcc-only"
  ln -sfn "$bcc_src" "$VENV/bcc-only/bcc"
  echo "$VENV/bcc-only" > "$site/debian-bcc.pth"
  echo "    $site/debian-bcc.pth -> $VENV/bcc-only"
fi

step "Python packages (pip install -e '.[dev]')"
mkdir -p "$STAMP_DIR"
# The C extensions (lb/control/_maglev.c, lb/dataplane/_conntab.c) are built by pip: lb/*/*.c
# is in the stamp too.
want="$(cat "$ROOT/pyproject.toml" "$ROOT"/lb/*/*.c 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP_DIR/pip" 2>/dev/null)" = "$want" ]; then skip "pyproject.toml and lb/*/*.c unchanged"; else
  # pip's chatter goes to a log; its tail is shown only if it fails.
  log="$STAMP_DIR/pip.log"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
         && "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "pip install -e '.[dev]' failed (full log: $log)"
  fi
  echo "$want" > "$STAMP_DIR/pip"
fi

# --- BCC smoke test --------------------------------------------------------------------------
step "BCC compiles and loads a trivial XDP program"
if [ "$(cat "$STAMP_DIR/bcc" 2>/dev/null)" = "$KVER" ]; then skip "checked for kernel $KVER"; else
  if ! err="$("$VENV/bin/python" - 2>&1 <<'PY'
from bcc import BPF
b = BPF(text="int xdp_ok(struct xdp_md *ctx) { return XDP_PASS; }")
b.load_func("xdp_ok", BPF.XDP)
PY
)"; then
    printf '%s\n' "$err" | tail -n 15 >&2
    die "BCC cannot compile a trivial program. Usually the kernel headers are wrong: check that
  /lib/modules/$KVER/build points at a headers tree (and /lib/modules/$KVER/source at its
  -common tree on Debian); remove both links and rerun this script to recreate them."
  fi
  echo "$KVER" > "$STAMP_DIR/bcc"
  echo "    ok"
fi

step "ready: $VENV/bin/python"
