#!/usr/bin/env bash
# System tools the cluster test (tests/cluster/test_ray_up.py) needs: sshd and rsync (Ray's
# launcher copies its key with rsync). Installs them with apt-get when missing and possible;
# otherwise says so, and that test skips with the reason.
set -uo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null || missing+=(rsync)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_system: ${missing[*]} missing (needs root and apt-get to install); the ray up test will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } ||
  echo "setup_system: could not install ${missing[*]}; the ray up test will skip"
exit 0
