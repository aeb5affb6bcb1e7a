# salmonn-pipeline on Ray 2.60 (Python 3.11). One Dockerfile, two images of the same project:
#
#   GPU workers (SALMONN inference, with the vLLM engine), the default base and lock:
#     docker build -t registry.example.com/salmonn-pipeline:0.1.0-gpu .
#   CPU decode workers and the head (the driver runs there), without vLLM:
#     docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#       --build-arg LOCK=docker/requirements.txt -t registry.example.com/salmonn-pipeline:0.1.0-cpu .
#
# rayproject/ray's "-gpu" tag is an alias of its default CUDA 12 image; pin a "-cuXXX" tag
# instead for reproducible builds. torch comes from the pinned requirements with its own CUDA
# runtime libraries (pip's nvidia-* packages), so the node's NVIDIA driver must support the CUDA
# version of that torch build; the base image's CUDA toolkit is not used by it.
#
# No model weights are baked in: mount them (jobs/nightly/rayjob.yaml mounts a volume at /models;
# run with --model /models/salmonn-13b, see the README's weights section) or let the workers fetch
# them from the hub when the model loads.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# The pinned runtime dependencies first: this layer changes only with the lock. The GPU image's
# (docker/requirements-gpu.txt) adds the [vllm] extra, whose vllm pins torch 2.14.0; the CPU
# image's (docker/requirements.txt) is the plain project (docker/make_lock.py writes both).
ARG LOCK=docker/requirements-gpu.txt
COPY --chown=ray:users ${LOCK} /opt/salmonn-pipeline/docker/requirements.lock
RUN python -m pip install --no-cache-dir -r /opt/salmonn-pipeline/docker/requirements.lock

# The project itself, without dependencies (all pinned above). /opt/salmonn-pipeline is also the
# working_dir of the KubeRay jobs' runtime env (jobs/nightly/*.yaml).
COPY --chown=ray:users . /opt/salmonn-pipeline
RUN python -m pip install --no-cache-dir --no-deps /opt/salmonn-pipeline

# The job's environment variables come from its runtime env (jobs/runtime_env.yaml).
WORKDIR /opt/salmonn-pipeline
