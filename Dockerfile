# modelfs: a read-only FUSE mount of gs://BUCKET/PREFIX for model servers.
#
#   docker build -t modelfs .
#   docker run --rm --privileged --device /dev/fuse \
#       -v /mnt/models:/mnt/models:rshared -e MODELFS_SOURCE=gs://bucket/prefix modelfs
#
# The base image is a build argument so the image also builds from a locally imported Debian
# (no registry): --build-arg BASE_IMAGE=localhost/debian:bookworm. Both stages must use the same
# base: the venv built in the first is copied into the second and uses its /usr/bin/python3.
# pyfuse3 ships no wheels, so it is compiled in the build stage; the final image has no compiler.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# PIP_CERT: a CA bundle path for pip, for builds behind a TLS-intercepting proxy (bind-mounted
# into the build, e.g. `podman build -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro
# --build-arg PIP_CERT=/run/host-ca.crt`). Empty: pip's own CA bundle.
ARG PIP_CERT=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev libfuse3-dev pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/modelfs
# Dependencies first, in their own layer: a change to modelfs' code does not rebuild pyfuse3.
COPY pyproject.toml /src/
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && /opt/modelfs/bin/pip install -r /tmp/requirements.txt
COPY README.md /src/
COPY modelfs /src/modelfs
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
 && /opt/modelfs/bin/pip install --no-deps /src \
 && /opt/modelfs/bin/pip uninstall -y -q pip setuptools \
 && find /opt/modelfs/lib -path '*/pyfuse3/*' \( -name '*.c' -o -name '*.pyx' -o -name '*.pxi' -o -name '*.pxd' -o -name '*.h' \) -delete \
 && /opt/modelfs/bin/python -c 'import modelfs.mount, modelfs.backends.gcs' \
 && /opt/modelfs/bin/modelfs --version

FROM ${BASE_IMAGE}
# fuse3: libfuse3 for pyfuse3 and fusermount3 for `modelfs unmount`; ca-certificates for GCS.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY --from=build /opt/modelfs /opt/modelfs
COPY packaging/entrypoint.sh /usr/local/bin/modelfs-entrypoint
# The disk cache defaults to $XDG_CACHE_HOME/modelfs/<source hash>: mount a volume at
# /var/cache/modelfs to keep it across restarts of the container.
ENV PATH=/opt/modelfs/bin:$PATH XDG_CACHE_HOME=/var/cache PYTHONDONTWRITEBYTECODE=1 \
    MODELFS_MOUNTPOINT=/mnt/models
RUN mkdir -p /mnt/models /var/cache/modelfs && modelfs --version
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/modelfs-entrypoint"]
CMD []
