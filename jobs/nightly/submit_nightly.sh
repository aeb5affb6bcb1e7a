#!/usr/bin/env bash
# Submit tonight's incremental index run as a Ray job and wait for it.
#   RAY_ADDRESS=http://HEAD:8265 jobs/nightly/submit_nightly.sh INPUT OUT [extra run options...]
# With token auth (Ray >= 2.59 default for local clusters), export RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) before calling.
set -euo pipefail
cd "$(dirname "$0")/../.."
input="$1"; out="$2"; shift 2
submission_id="${SUBMISSION_ID:-salmonn-nightly-$(date -u +%Y-%m-%d)}"
if ray job status "$submission_id" >/dev/null 2>&1; then
  echo "job $submission_id already exists; following its logs"
  exec ray job logs --follow "$submission_id"
fi
exec ray job submit \
  --submission-id "$submission_id" \
  --working-dir . \
  --runtime-env jobs/runtime_env.yaml \
  -- python -m jobs.index_archive "$input" --out "$out" --no-progress "$@"
