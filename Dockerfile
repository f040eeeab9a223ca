# syntax=docker/dockerfile:1
# podmeter's node agent image: `make image` (docker build -t podmeter:VERSION .).
#
# Stage 1 compiles the CO-RE eBPF object (clang, bpftool for vmlinux.h, libbpf headers) and builds the wheel.
# Stage 2 is the runtime: Python slim + libbpf1 (loaded through ctypes by the ebpf receiver) + a virtual
# environment holding podmeter and its locked dependencies. No compiler, no headers, no pip cache at run time.
#
# vmlinux.h comes from the build machine's /sys/kernel/btf/vmlinux. CO-RE relocates against each node's own
# kernel BTF at load time, so the image runs on other kernels. A builder without BTF: run `make bpf` on a machine
# with it first; the vmlinux.h it leaves in receivers/ebpf/ is used as is.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm bpftool libbpf-dev libelf-dev make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY podmeter/ podmeter/
COPY receivers/ receivers/
COPY processors/ processors/
COPY exporters/ exporters/
# the eBPF object first: the wheel's package data picks up receivers/ebpf/podmeter.bpf.o
RUN make -C receivers/ebpf \
 && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && python -m venv /opt/podmeter \
 && /opt/podmeter/bin/pip install --no-cache-dir -c constraints.txt /dist/podmeter-*.whl \
 && /opt/podmeter/bin/podmeter components

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="podmeter" \
      org.opencontainers.image.description="Per-pod GPU, CPU, memory and kernel metrics agent for Kubernetes nodes, shaped like an OpenTelemetry Collector" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.vendor="podmeter"
RUN apt-get update \
 && apt-get install -y --no-install-recommends libbpf1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent podmeter
COPY --from=build /opt/podmeter /opt/podmeter
ENV PATH=/opt/podmeter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default. The DaemonSet runs it as UID 0 with every capability dropped but BPF and PERFMON: the
# CRI and kubelet sockets are root-only and Kubernetes grants added capabilities to UID 0 only (docs/deploy.md).
USER 10001:10001
EXPOSE 9464 8888 13133
ENTRYPOINT ["podmeter"]
# the packaged default pipelines.yaml; the DaemonSet passes its ConfigMap's files instead
CMD ["run"]
