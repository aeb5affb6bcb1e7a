# salmonn-pipeline on Ray 2.60 (Python 3.11). One Dockerfile, two images of the same project:
#
#   GPU workers (SALMONN inference), the default base:
#     docker build -t registry.example.com/salmonn-pipeline:0.1.0-gpu .
#   CPU decode workers and the head (the driver runs there):
#     docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#       -t registry.example.com/salmonn-pipeline:0.1.0-cpu .
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

# The pinned runtime dependencies first: this layer changes only with docker/requirements.txt.
COPY --chown=ray:users docker/requirements.txt /opt/salmonn-pipeline/docker/requirements.txt
RUN python -m pip install --no-cache-dir -r /opt/salmonn-pipeline/docker/requirements.txt

# The project itself, without dependencies (all pinned above). /opt/salmonn-pipeline is also the
# working_dir of the KubeRay jobs' runtime env (jobs/nightly/*.yaml).
COPY --chown=ray:users . /opt/salmonn-pipeline
RUN python -m pip install --no-cache-dir --no-deps /opt/salmonn-pipeline

# The job's environment variables come from its runtime env (jobs/runtime_env.yaml).
WORKDIR /opt/salmonn-pipeline
