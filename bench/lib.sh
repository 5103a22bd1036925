# Shared by bench/run.sh and bench/instructions.sh (sourced, with ROOT set),
# so both measure the same gateway.

# One RS256 token (the test suite's key), reused by every request of the
# bearer targets: the gateway verifies it once and then serves it from its
# token cache, as it would a real client's.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
mint_token() {
    local key=$ROOT/tests/keys/rsa1.pem header payload sig
    header=$(printf '{"alg":"RS256","typ":"JWT"}' | b64url)
    payload=$(printf '{"sub":"bench-user","exp":%d}' $(( $(date +%s) + 86400 )) | b64url)
    sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign "$key" | b64url)
    printf '%s.%s.%s' "$header" "$payload" "$sig"
}

# big_body: the compressed JSON route's body: 30 users, about 3 KiB (nginx
# takes at most 4 KiB in one `return`), as an API list answer looks
# (repetitive field names, varied values).
big_body() {
    python3 -c '
import json
users = [{"id": i, "name": f"user-{i:04d}", "email": f"user{i}@example.com", "active": i % 3 != 0,
          "roles": ["reader"] + (["editor"] if i % 4 == 0 else []), "score": (i * 7919) % 1000 / 10}
         for i in range(30)]
print(json.dumps({"users": users, "total": 30}, separators=(",", ":")))'
}

# free_port: a TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# upstream_nginx_conf WORK PORT: the upstream of the profiling scripts
# (instructions.sh, build-pgo.sh): one nginx worker on 127.0.0.1:PORT
# answering the bench's small JSON body, and big_body under /big/.
upstream_nginx_conf() {
    local work=$1 port=$2
    cat <<EOF
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    server {
        listen 127.0.0.1:$port;
        default_type application/json;
        location / { return 200 '{"ok":true,"service":"bench","id":7,"v":1}'; }
        location /big/ { return 200 '$(big_body)'; }
    }
}
EOF
}

# cluster_route: the `limited` route's limit counted in Redis (append under
# `routes:` with a `cluster:` section).
cluster_route() {
    cat <<YAML
  - name: clustered
    match: { path_prefix: /clustered }
    upstream: app
    strip_prefix: /clustered
    rate_limit: { requests: 1000000000, per: 1s, key: ip, scope: cluster }
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
YAML
}

# gatehouse_routes UPSTREAM_PORT: the cache, upstream, auth and routes
# sections of every benchmarked gatehouse.
gatehouse_routes() {
    cat <<YAML
cache: { max_size: 64MiB }
upstreams:
  app:
    targets: [127.0.0.1:$1]
  # The same server under a second name: a split's other side.
  app-canary:
    targets: [127.0.0.1:$1]
auth:
  jwt:
    bench:
      algorithms: [RS256]
      public_key_file: $ROOT/tests/keys/rsa1.pub.pem
routes:
  # RS256 auth and a rate limit (high enough never to refuse), one token.
  - name: auth-limited
    match: { path_prefix: /auth }
    upstream: app
    strip_prefix: /auth
    auth: bench
    rate_limit: { requests: 1000000000, per: 1s, key: ip }
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
  # A local rate limit (never refusing): gatehouse-cluster's route counts
  # the same limit in Redis.
  - name: limited
    match: { path_prefix: /limited }
    upstream: app
    strip_prefix: /limited
    rate_limit: { requests: 1000000000, per: 1s, key: ip }
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
  # The compressed JSON route: the upstream's 3 KiB list, gzip (level 6).
  - name: gzipped
    match: { path_prefix: /gzip }
    upstream: app
    strip_prefix: /gzip
    add_prefix: /big
    compression: { }
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
  # A 90/10 canary split drawn per request (no key).
  - name: split
    match: { path_prefix: /split }
    split:
      to:
        - { upstream: app, weight: 90 }
        - { upstream: app-canary, weight: 10 }
    strip_prefix: /split
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
  # Served from the cache after the first request: the upstream never sees the rest.
  - name: cached
    match: { path_prefix: /cached }
    upstream: app
    strip_prefix: /cached
    cache: { ttl: 1h }
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
  - name: plain
    match: { path_prefix: / }
    upstream: app
    request_headers: { set: { X-Gateway: gatehouse } }
    response_headers: { remove: [Server] }
YAML
}
