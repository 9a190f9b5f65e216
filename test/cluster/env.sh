# source test/cluster/env.sh: kubectl v1.34 (from the rig's cache) first on PATH and the rig's admin kubeconfig
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export PATH=$K8S_BIN:$PATH
export KUBECONFIG=$RIG/admin.kubeconfig
