#!/usr/bin/env bash
# Mints an RS256 token for the example configuration's `demo` provider,
# signed with the DEMO key in conf/keys (never use it for anything real).
#
#   scripts/demo-token.sh [SUBJECT] [SCOPES] [ROLE]
#   curl -H "Authorization: Bearer $(scripts/demo-token.sh alice account:read)" localhost:8080/v1/account
set -euo pipefail
cd "$(dirname "$0")/.."
sub=${1:-alice}
scope=${2:-account:read}
role=${3:-user}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"RS256","typ":"JWT"}' | b64url)
payload=$(printf '{"sub":"%s","scope":"%s","role":"%s","iss":"https://demo.gatehouse.local","aud":"demo-api","iat":%d,"exp":%d}' \
    "$sub" "$scope" "$role" "$now" $((now + 3600)) | b64url)
sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign conf/keys/demo-rs256.pem | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$sig"
