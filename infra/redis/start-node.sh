#!/bin/sh
# Starts one node of the gateway's Redis Cluster in a container: writes the ACL file
# from users.acl (next to this script) with each user's password from
# REDIS_<USER>_PASSWORD (REDIS_ADMIN_PASSWORD, REDIS_GATEWAY_PASSWORD), readable by
# the server only, then runs redis-server with node.conf and the given arguments
# (--port, --bind, --cluster-config-file, --dir; see node.conf).
# REDIS_ANNOUNCE_HOSTNAME: the name clients should use for this node (below).
set -eu
here=$(dirname "$0")
acl=${REDIS_ACL_FILE:-/tmp/users.acl}
umask 077
: > "$acl"
while read -r word name rules; do
  [ "$word" = user ] || continue
  var="REDIS_$(echo "$name" | tr 'a-z-' 'A-Z_')_PASSWORD"
  eval "password=\${$var:-}"
  if [ "$name" != default ] && [ -z "$password" ]; then
    echo "start-node.sh: set $var" >&2
    exit 2
  fi
  if [ -n "$password" ]; then rules=">$password $rules"; fi
  echo "user $name $rules" >> "$acl"
done < "$here/users.acl"
# A container can come back from a stop with a new address: with
# REDIS_ANNOUNCE_HOSTNAME (its service name) clients are told the name, not the
# address, so they find the node again through DNS.
if [ -n "${REDIS_ANNOUNCE_HOSTNAME:-}" ]; then
  set -- "$@" --cluster-announce-hostname "$REDIS_ANNOUNCE_HOSTNAME" \
    --cluster-preferred-endpoint-type hostname
fi
exec redis-server "$here/node.conf" --aclfile "$acl" "$@"
