#!/usr/bin/env bash
# Prepare this host to boot the kernels of scripts/kernels.conf under qemu (make test-kernels).
# Idempotent: what is installed already is skipped. Run as root. Arguments: kernel names from
# kernels.conf (default: all of them).
#
# Installs: qemu-system-x86, busybox-static and udev (virtme-ng's guest needs them), the kernel
# image and headers packages of each kernel (nothing boots from them on this host: installing
# a linux-image only adds files under /boot and /lib/modules), and virtme-ng into its own venv
# (.venv-vng), apart from the project's venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONF="$ROOT/scripts/kernels.conf"
VNG_VENV="$ROOT/.venv-vng"
VNG_VERSION=1.42
APT_PKGS=(qemu-system-x86 busybox-static udev)

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
skip() { printf '    %s (already done)\n' "$*"; }
die() { printf 'setup-kernels: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo $0"
[ -r "$CONF" ] || die "no $CONF"

declare -A RELEASE=()
ORDER=()
while read -r name release _; do
  case "$name" in ''|'#'*) continue ;; esac
  RELEASE[$name]="$release"; ORDER+=("$name")
done < "$CONF"
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${ORDER[@]}")
for k in "${wanted[@]}"; do
  [ -n "${RELEASE[$k]:-}" ] || die "kernel '$k' is not in $CONF (known: ${ORDER[*]})"
done

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
pkgs=("${APT_PKGS[@]}")
for k in "${wanted[@]}"; do
  pkgs+=("linux-image-${RELEASE[$k]}" "linux-headers-${RELEASE[$k]}")
done
step "apt packages: ${pkgs[*]}"
missing=()
for p in "${pkgs[@]}"; do is_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then skip "all installed"; else
  echo "    installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # Kernel post-install hooks (initramfs, bootloader) are not needed: virtme-ng boots the
  # image directly. They may still run; none of them changes how this host boots when
  # there is no bootloader to update.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
for k in "${wanted[@]}"; do
  r="${RELEASE[$k]}"
  [ -r "/boot/vmlinuz-$r" ] || die "/boot/vmlinuz-$r is missing after installing linux-image-$r"
  [ -e "/lib/modules/$r/build" ] || die "/lib/modules/$r/build is missing after installing linux-headers-$r"
done

step "virtme-ng $VNG_VERSION in $VNG_VENV"
if [ -x "$VNG_VENV/bin/vng" ] && "$VNG_VENV/bin/python" -m pip show virtme-ng 2>/dev/null | grep -qx "Version: $VNG_VERSION"; then
  skip "installed"
else
  python3 -m venv "$VNG_VENV"
  "$VNG_VENV/bin/python" -m pip install -q "virtme-ng==$VNG_VERSION" >"$VNG_VENV/pip.log" 2>&1 \
    || { tail -n 20 "$VNG_VENV/pip.log" >&2; die "pip install virtme-ng==$VNG_VERSION failed"; }
fi
step "ready: ${wanted[*]}"
