# Shared by the launch scripts (sourced; each sets PROG and usage() first):
# the option parser, one-line errors, shell quoting of printed commands, and
# --dry-run aware runners.
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

# parse_options VALUE_SPECS FLAG_SPECS ARGS...
# The launch scripts' one option parser: sets the script's variables named in
# the specs (each spec list is whitespace-separated words) from ARGS.
#   --NAME=VAR    in VALUE_SPECS: --NAME=V or --NAME V sets VAR=V (non-empty;
#                 a separate V may not start with --: that is a missing value)
#   --NAME+=ARR   in VALUE_SPECS: repeatable, each V is appended to array ARR;
#                 such values are options for another program, so a separate
#                 V may start with --
#   --NAME=VAR    in FLAG_SPECS: --NAME sets VAR=1 (and takes no value)
# -h/--help calls the script's usage() and exits 0; the arguments after --
# are kept, unchanged, in the array EXTRA. Options are read in order, and the
# first mistake (unknown option, missing value, value on a flag) ends the
# script with one line on stderr and exit code 2.
parse_options() {
  local -A sets=() appends=() flags=()
  local spec arg name val inline
  for spec in $1; do
    if [[ $spec == --*+=* ]]; then appends[${spec%%+=*}]=${spec#*+=}
    else sets[${spec%%=*}]=${spec#*=}; fi
  done
  for spec in $2; do flags[${spec%%=*}]=${spec#*=}; done
  shift 2
  EXTRA=()
  while (( $# )); do
    arg=$1 name=$1 val="" inline=0
    if [[ $arg == --?*=* ]]; then name=${arg%%=*} val=${arg#*=} inline=1; fi
    if [[ $arg == -- ]]; then
      shift
      # shellcheck disable=SC2034  # read by the script that sourced this file
      EXTRA=("$@")
      return 0
    elif [[ $name == -h || $name == --help ]]; then
      (( ! inline )) || die "$name takes no value"
      usage
      exit 0
    elif [[ $name == --?* && -n ${sets[$name]+x}${appends[$name]+x} ]]; then
      if (( ! inline )); then
        if (( $# < 2 )) || [[ -z ${appends[$name]+x} && $2 == --* ]]; then
          die "$name needs a value"
        fi
        val=$2
        shift
      fi
      [[ -n $val ]] || die "$name needs a value"
      if [[ -n ${appends[$name]+x} ]]; then
        # The array's name comes from the script, the value stays quoted.
        eval "${appends[$name]}+=(\"\$val\")"
      else
        printf -v "${sets[$name]}" '%s' "$val"
      fi
    elif [[ $name == --?* && -n ${flags[$name]+x} ]]; then
      (( ! inline )) || die "$name takes no value"
      printf -v "${flags[$name]}" '%s' 1
    else
      die "unknown option '$arg' (see $PROG --help)"
    fi
    shift
  done
}
