#!/usr/bin/env bash
# CA, serving certs (apiserver, kubelet), client certs (admin, kubelet, controller-manager, scheduler,
# apiserver->kubelet), service-account key pair and kubeconfigs, under $RIG/pki. Kept across runs: only what is
# missing is generated.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$PKI" && cd "$PKI"
[ -f ca.key ] || {
  openssl genrsa -out ca.key 2048 2>/dev/null
  openssl req -x509 -new -nodes -key ca.key -subj "/CN=podkeeper-e2e-ca" -days 3650 -out ca.crt
}
sign() { # name subject [extfile]; without an extfile: a client certificate
  local n=$1 subj=$2 ext=${3:-}
  [ -f "$n.crt" ] && return 0
  if [ -z "$ext" ]; then
    ext=client.ext
    printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >client.ext
  fi
  openssl genrsa -out "$n.key" 2048 2>/dev/null
  openssl req -new -key "$n.key" -subj "$subj" -out "$n.csr"
  openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out "$n.crt" -extfile "$ext" 2>/dev/null
  rm -f "$n.csr"
}
cat >apiserver.ext <<X
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
X
sign apiserver "/CN=kube-apiserver" apiserver.ext
cat >kubelet-serving.ext <<X
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:$NODE_NAME
X
sign kubelet-serving "/CN=$NODE_NAME" kubelet-serving.ext
sign admin "/O=system:masters/CN=admin"
sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
sign controller-manager "/CN=system:kube-controller-manager"
sign scheduler "/CN=system:kube-scheduler"
[ -f sa.key ] || { openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }
mkcfg() { # file user cert
  cat >"$1" <<X
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    certificate-authority: $PKI/ca.crt
    server: https://127.0.0.1:$APISERVER_PORT
users:
- name: $2
  user:
    client-certificate: $PKI/$3.crt
    client-key: $PKI/$3.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $2}
current-context: e2e
X
}
mkcfg "$RIG/admin.kubeconfig" admin admin
mkcfg "$RIG/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet
mkcfg "$RIG/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
mkcfg "$RIG/scheduler.kubeconfig" system:kube-scheduler scheduler
