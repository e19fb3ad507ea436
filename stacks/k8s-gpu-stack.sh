#!/usr/bin/env bash
# Register tracesft's production ZenML stack: a Kubernetes orchestrator on a cluster with GPU nodes,
# an S3 (or GCS) artifact store, a container registry and an image builder, with the team's MLflow
# tracking server and registry reached through the stack's environment and credentials held in a
# ZenML secret. Run it once, with the ZenML client connected to the team's ZenML server
# (`zenml login https://zenml.example.org`), kubectl pointing at the cluster, and the values below
# exported. Secrets are read from the environment of the person running this, stored in ZenML's
# secret store and injected into the step pods at run time: never written to a file or an image.
#
#   export KUBE_CONTEXT=gpu-cluster ARTIFACT_URI=s3://my-bucket/tracesft \
#          REGISTRY_URI=123456789012.dkr.ecr.eu-west-1.amazonaws.com \
#          MLFLOW_TRACKING_URI=https://mlflow.example.org
#   export HF_TOKEN=... MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...
#   bash stacks/k8s-gpu-stack.sh
#   zenml stack set tracesft-gpu
set -euo pipefail

: "${KUBE_CONTEXT:?the kubectl context of the GPU cluster}"
: "${ARTIFACT_URI:?s3://BUCKET/PREFIX (or gs://BUCKET/PREFIX)}"
: "${REGISTRY_URI:?the container registry the cluster pulls from}"
: "${MLFLOW_TRACKING_URI:?the team MLflow tracking server, e.g. https://mlflow.example.org}"
NAMESPACE="${NAMESPACE:-zenml}"
STACK="${STACK:-tracesft-gpu}"

# Credentials: a ZenML secret, injected as environment variables into every step of the stack.
# HF_TOKEN for gated hub models; MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD (or _TOKEN).
zenml secret create "${STACK}-credentials" \
    --HF_TOKEN="${HF_TOKEN:-}" \
    --MLFLOW_TRACKING_USERNAME="${MLFLOW_TRACKING_USERNAME:-}" \
    --MLFLOW_TRACKING_PASSWORD="${MLFLOW_TRACKING_PASSWORD:-}"

# The orchestrator runs every step as a pod; zenml_config.yaml's per-step
# `orchestrator.kubernetes` settings put the GPU steps on GPU nodes (node selector, toleration,
# nvidia.com/gpu limit). The image runs as uid 10001, so pods may require runAsNonRoot.
zenml orchestrator register "${STACK}-k8s" --flavor=kubernetes \
    --kubernetes_context="$KUBE_CONTEXT" --kubernetes_namespace="$NAMESPACE"

case "$ARTIFACT_URI" in
    s3://*) zenml artifact-store register "${STACK}-store" --flavor=s3 --path="$ARTIFACT_URI" ;;
    gs://*) zenml artifact-store register "${STACK}-store" --flavor=gcp --path="$ARTIFACT_URI" ;;
    *) echo "ARTIFACT_URI must start with s3:// or gs://" >&2; exit 2 ;;
esac

zenml container-registry register "${STACK}-registry" --flavor=default --uri="$REGISTRY_URI"
# `local` builds with the Docker engine of the machine that starts the run; use
# `--flavor=kaniko --kubernetes_context=...` to build inside the cluster instead.
zenml image-builder register "${STACK}-builder" --flavor=local

zenml stack register "$STACK" \
    -o "${STACK}-k8s" -a "${STACK}-store" -c "${STACK}-registry" -i "${STACK}-builder" \
    --secret "${STACK}-credentials" \
    --env "MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
echo "Registered stack $STACK. Next: zenml stack set $STACK"
