# Sourced by the test scripts: `host_deps cmd:debian-package ...` makes sure each command exists.
# Missing ones are installed from Debian (apt-get update once, only when needed) when running as root;
# otherwise the script stops with the exact apt-get line to run. CI needs nothing preinstalled but Go,
# git, make and npm: every other host tool comes through here.
host_deps() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing host tools; install them with: apt-get install -y ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]} (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}
