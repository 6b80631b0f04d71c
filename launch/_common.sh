# Shared by the launch scripts (sourced; each sets PROG first): one-line
# errors, shell quoting of printed commands, and --dry-run aware runners.
# shellcheck shell=bash

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }

# Shell-quotes each argument only where needed, so printed commands paste back
# (--flag='a value' keeps the flag name outside the quotes).
quote() {
  local out="" a prefix q="'" escaped="'\\''"
  for a in "$@"; do
    prefix=""
    if [[ $a =~ ^--[A-Za-z0-9_.-]+= ]]; then
      prefix=${BASH_REMATCH[0]}; a=${a#"$prefix"}
    fi
    if [[ -z $a || $a == *[!A-Za-z0-9_./:=,@%+-]* ]]; then
      a=${a//"$q"/"$escaped"}; a="'$a'"
    fi
    out+=" $prefix$a"
  done
  printf '%s\n' "${out# }"
}

run() {
  if (( DRY_RUN )); then quote "$@"; return 0; fi
  printf '+ %s\n' "$(quote "$@")" >&2
  "$@"
}

run_shell() {  # one shell line (a pipeline)
  if (( DRY_RUN )); then printf '%s\n' "$1"; return 0; fi
  printf '+ %s\n' "$1" >&2
  bash -c "$1"
}
