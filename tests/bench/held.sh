# Sourced by profile.sh and ab.sh: compare.sh's whole setup (upstream, nginx, HAProxy, plane,
# agent) started with --hold in DIR, its addresses loaded from DIR/env. Sets HOLD_PID, whose
# TERM stops it all.
start_held() { # dir
  "$(dirname "${BASH_SOURCE[0]}")/compare.sh" --hold "$1" > "$1/hold.log" 2>&1 &
  HOLD_PID=$!
  for _ in $(seq 1 600); do [ -f "$1/env" ] && break; sleep 0.1; done
  [ -f "$1/env" ] || { cat "$1/hold.log" >&2; exit 1; }
  # shellcheck disable=SC1091
  . "$1/env"
}
