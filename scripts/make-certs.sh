#!/usr/bin/env bash
# Self-signed certificates for a fedpit federation on Flower: a CA, a SuperLink certificate for the
# names given (default: localhost and 127.0.0.1), and optionally SuperNode authentication keys.
#   scripts/make-certs.sh certs/ [link.example.org 10.0.0.5] [--nodes clinic-a clinic-b]
# Gives: ca.crt (give to every SuperNode and submitter), server.pem + server.key (SuperLink only),
# <node> and <node>.pub per SuperNode (register the .pub with `fedpit flower register`).
set -euo pipefail
out="${1:?usage: make-certs.sh OUT_DIR [HOST ...] [--nodes NAME ...]}"; shift
hosts=(); nodes=()
while (($#)); do
  if [[ "$1" == "--nodes" ]]; then shift; nodes=("$@"); break; fi
  hosts+=("$1"); shift
done
((${#hosts[@]})) || hosts=(localhost 127.0.0.1)
mkdir -p "$out"; chmod 700 "$out"; cd "$out"
san=""
for h in "${hosts[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt -subj "/CN=fedpit-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=${hosts[0]}" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "${san%,}" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out server.pem -extfile san.ext 2>/dev/null
rm -f server.csr san.ext ca.srl
for n in "${nodes[@]}"; do ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$n"; done
chmod 600 ./*.key
echo "certificates in $out: ca.crt server.pem server.key ${nodes[*]:+(+ keys: ${nodes[*]})}"
