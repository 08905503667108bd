# syntax=docker/dockerfile:1
# The unet-tile HTTP service on a GPU.
#   docker build -t unet-tile .
#   docker run --gpus all -p 8000:8000 -v "$PWD/models:/models" \
#       -e UNET_CHECKPOINT=/models/x.safetensors unet-tile
# The base image brings CUDA, cuDNN and a CUDA build of PyTorch. Installing the package keeps
# that torch (a constraint pins it to the installed version), so no multi-GB wheel is pulled.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY unet ./unet
COPY unet_tile ./unet_tile
COPY tiling ./tiling
COPY service ./service
# Extras: OME-Zarr in/out, Dask workers, and OpenVINO, which runs the CPU when there is no GPU.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[ome-zarr,dask,openvino]" \
    && rm /tmp/torch-constraint.txt \
    && python -c "import torch, service.app; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && python -c "from service.routes.page import STATIC; assert (STATIC / 'app.js').is_file(), 'the page is missing'" \
    && groupadd --gid 10001 unet \
    && useradd --create-home --uid 10001 --gid 10001 unet \
    && mkdir -p /models /jobs \
    && chown unet:unet /models /jobs

# Checkpoints live in a volume; without UNET_CHECKPOINT the bundled demo model is served.
# Jobs (uploads, state, results) live in another, so they survive the container.
VOLUME ["/models", "/jobs"]
ENV UNET_HOST=0.0.0.0 \
    UNET_PORT=8000 \
    UNET_DEVICE=auto \
    UNET_JOBS_DIR=/jobs
USER 10001:10001
EXPOSE 8000
# No curl in the base image: probe with Python's standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UNET_PORT', '8000'), timeout=4)"]
# Exec form: the server is PID 1 and receives SIGTERM itself (graceful shutdown).
ENTRYPOINT ["unet-tile"]
CMD ["serve"]
