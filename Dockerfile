# medfastsam in a container: the CLI on Debian with the software Vulkan driver (Mesa lavapipe), so it
# runs on any node; on GPU nodes mount or install the vendor's Vulkan ICD (e.g. NVIDIA's container
# toolkit with NVIDIA_DRIVER_CAPABILITIES=compute,graphics) and wgpu picks the GPU over lavapipe.
#
#   docker build -t medfastsam .
#   docker run --rm -v "$PWD/slides:/data:ro" -v "$PWD/out:/out" medfastsam \
#       segment /data --weights /data/model.safetensors --instances --out /out
#
# The build stage runs the repository's own installer (.ci/setup: the apt packages CI uses, without
# the browser and the pretrained downloads), so the container and CI install the same drivers.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN SKIP_BROWSER=1 SKIP_PRETRAINED=1 SKIP_OPENSLIDE=1 bash .ci/setup \
 && cargo build --release --locked --bin medfastsam

FROM debian:bookworm-slim
# The runtime half of .ci/setup's package list: the Vulkan loader and Mesa's drivers (lavapipe).
RUN apt-get update \
 && apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 libegl1 libegl-mesa0 libgl1-mesa-dri ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/medfastsam /usr/local/bin/medfastsam
ENV XDG_RUNTIME_DIR=/tmp
ENTRYPOINT ["medfastsam"]
CMD ["--help"]
