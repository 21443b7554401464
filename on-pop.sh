#!/bin/sh
# Example `command` action (config.example.toml, [actions.hook]): spop runs it once per pop, with
# the caller's values after "--" as arguments and every field as SPOP_<FIELD> in the environment.
# What it prints goes to the listener's diagnostics file (`spop diag tail`).
[ "$1" = "--" ] && shift
echo "pop for ${SPOP_MEDIA:-?} ${SPOP_RESOURCE:-?}: source=$1 code1=$2 queue=${SPOP_QUEUE_NAME:-}"
