#!/bin/sh
# A throwaway CA for one migration, and the certificates QEMU's tls-creds-x509 reads:
#   throwaway-ca.sh DIR ADDRESS [NAME]
# DIR gets ca-cert.pem, server-cert.pem, server-key.pem (the destination's, valid for
# ADDRESS and NAME) and client-cert.pem, client-key.pem (the source's). The CA's key is
# removed at the end: nothing else can ever be signed with it. Valid for one day.
set -eu
dir=$1
address=$2
name=${3:-$2}
umask 077
cd "$dir"
case $address in
    *[!0-9.]*) case $address in *:*) san="IP:$address" ;; *) san="DNS:$address" ;; esac ;;
    *) san="IP:$address" ;;
esac
if [ "$name" != "$address" ]; then san="$san,DNS:$name"; fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=qemu.qmp migration CA" \
    -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
for role in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name $role" \
        -keyout "$role-key.pem" -out "$role.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=%sAuth\nsubjectAltName=%s\n' \
        "$role" "$san" > "$role.ext"
    openssl x509 -req -in "$role.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 1 \
        -extfile "$role.ext" -out "$role-cert.pem" 2>/dev/null
    rm -f "$role.csr" "$role.ext"
done
rm -f ca-key.pem ca-cert.srl
