#!/bin/sh
# Start SeaweedFS as an S3 server (`weed mini`: master, volume, filer and S3
# gateway in one process) for the compose rehearsal. The identities file that
# makes it refuse unknown keys is written at start-up from two secret files, so
# no key is ever part of an image or of compose.yaml. POSIX sh: the official
# image is Alpine (busybox sh).
#
# Environment (defaults are the container's paths):
#   S3_ACCESS_KEY_FILE  file holding the access key id  (/run/secrets/aws_access_key_id)
#   S3_SECRET_KEY_FILE  file holding the secret key     (/run/secrets/aws_secret_access_key)
#   S3_BUCKET           bucket to create                (shardflow)
#   S3_PORT             S3 port                         (8333; its gRPC port is S3_PORT+10000)
#   S3_BIND             address all ports listen on     (0.0.0.0)
#   S3_DATA_DIR         where objects live              (/data)
#   S3_STATE_DIR        identities file and sockets     (/tmp/shardflow-s3; not on the data volume)
#   WEED                the weed binary                 (/usr/bin/weed, else weed on PATH)
set -eu

key_file="${S3_ACCESS_KEY_FILE:-/run/secrets/aws_access_key_id}"
secret_file="${S3_SECRET_KEY_FILE:-/run/secrets/aws_secret_access_key}"
bucket="${S3_BUCKET:-shardflow}"
port="${S3_PORT:-8333}"
bind="${S3_BIND:-0.0.0.0}"
data_dir="${S3_DATA_DIR:-/data}"
state_dir="${S3_STATE_DIR:-/tmp/shardflow-s3}"
weed="${WEED:-}"
if [ -z "$weed" ]; then
  if [ -x /usr/bin/weed ]; then weed=/usr/bin/weed; else weed=weed; fi
fi

fail() {
  echo "start-seaweedfs: $1" >&2
  exit 2
}

for f in "$key_file" "$secret_file"; do
  [ -r "$f" ] || fail "cannot read $f: provide the S3 keys as secrets (see docker/README.md)"
done
key="$(cat "$key_file")"
secret="$(cat "$secret_file")"
if [ -z "$key" ] || [ -z "$secret" ]; then
  fail "the access key and the secret key must not be empty"
fi
# The keys are pasted into JSON below: refuse characters that would need escaping.
case "$key$secret" in
  *[!A-Za-z0-9_./+=-]*) fail "keys may hold only letters, digits and _ . / + = -" ;;
esac

umask 077
mkdir -p "$data_dir" "$state_dir"
printf '{"identities":[{"name":"shardflow","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}\n' \
  "$key" "$secret" >"$state_dir/s3.json"

# -ip=127.0.0.1: the servers inside this one process talk over loopback, while
# -ip.bind lets other containers reach the S3 port. The local sockets go to the
# state dir so that two instances (tests, a second project) never share them.
exec "$weed" -logtostderr=true mini \
  -dir="$data_dir" \
  -ip=127.0.0.1 \
  -ip.bind="$bind" \
  -master.telemetry=false \
  -s3.port="$port" \
  -s3.config="$state_dir/s3.json" \
  -bucket="$bucket" \
  -s3.localSocket="$state_dir/s3.sock" \
  -filer.localSocket="$state_dir/filer.sock" \
  -webdav=false \
  -admin.ui=false \
  -s3.port.iceberg=0 \
  -s3.port.lance=0
