#!/usr/bin/env bash
# Entry point of the shardflow images.
#
#   IMAGE --nproc-per-node=gpu -m train ...   runs torchrun --nproc-per-node=gpu -m train ...
#   IMAGE shard pack SRC DEST ...             runs that command (any program on PATH)
#   IMAGE bash                                opens a shell
#
# Before that it:
#   * loads secrets from files: for VAR in SECRET_VARS, VAR_FILE=/run/secrets/x sets VAR to
#     the file's contents (Docker/compose secrets, Kubernetes secret volumes), so that keys
#     never have to sit in an image, a compose file or `docker inspect` output;
#   * with SHARDFLOW_WAIT_FOR_S3=s3://bucket[/...], waits until that bucket answers signed
#     requests (creating it if the server has none), for at most SHARDFLOW_WAIT_TIMEOUT_S
#     seconds (default 120): object stores started beside the job need a few seconds.
set -euo pipefail

SECRET_VARS=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN)

die() {
  echo "shardflow-entrypoint: $1" >&2
  exit "${2:-2}"
}

load_secret_files() {
  local var file_var file
  for var in "${SECRET_VARS[@]}"; do
    file_var="${var}_FILE"
    file="${!file_var:-}"
    [[ -n "$file" ]] || continue
    # Two sources for one value would leave the user guessing which one won.
    [[ -z "${!var:-}" ]] || die "both $var and $file_var are set; set only one"
    [[ -f "$file" && -r "$file" ]] || die "$file_var=$file is not a readable file"
    # $(<file) drops the trailing newline that `echo key > file` leaves.
    export "$var=$(<"$file")"
    unset "$file_var"
  done
}

wait_for_s3() {
  python - "$1" "${SHARDFLOW_WAIT_TIMEOUT_S:-120}" <<'PY'
import sys
import time

import s3fs

url, timeout_s = sys.argv[1], float(sys.argv[2])
if not url.startswith("s3://") or len(url) <= len("s3://"):
    sys.exit(f"shardflow-entrypoint: SHARDFLOW_WAIT_FOR_S3 must be s3://bucket[/prefix], got {url!r}")
bucket = url[len("s3://") :].split("/", 1)[0]
deadline = time.monotonic() + timeout_s
last_error = "no answer"
while True:
    # A fresh client each try: a cached one keeps a failed connection's state.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}})
    try:
        fs.ls(bucket, refresh=True)
        break
    except FileNotFoundError:
        # The server answers but holds no such bucket yet (SeaweedFS creates its
        # -bucket lazily): create it, then look again.
        try:
            fs.mkdir(bucket)
        except Exception as exc:  # noqa: BLE001 - reported if the wait runs out
            last_error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - server still starting, or refusing us
        last_error = f"{type(exc).__name__}: {exc}"
    if time.monotonic() >= deadline:
        sys.exit(f"shardflow-entrypoint: s3://{bucket} did not answer within {timeout_s:g} s ({last_error})")
    time.sleep(1.0)
PY
}

load_secret_files
if [[ -n "${SHARDFLOW_WAIT_FOR_S3:-}" ]]; then
  wait_for_s3 "$SHARDFLOW_WAIT_FOR_S3" || exit 1
fi

# No command, or one that starts with a flag: these are torchrun's arguments.
if [[ $# -eq 0 || "$1" == -* ]]; then
  set -- torchrun "$@"
fi
exec "$@"
