# One image for the three services; docker-compose.yml chooses the command per service
# (python -m services.memory | services.ltm | services.chat_ai).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app

# torch first and alone, the CPU build (PyPI's Linux wheel is the CUDA one, ~GBs larger).
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

# Runtime requirements, with every transitive version pinned (constraints.txt also pins
# torch==2.13.0, which the +cpu build satisfies, so nothing can pull another torch).
COPY requirements.txt constraints.txt ./
RUN pip install -c constraints.txt -r requirements.txt

COPY shared ./shared
COPY services ./services
COPY mesh ./mesh

# The embedding model as ONNX (shared/runtime/onnx_export.py), into /usr/local/share/memory-mesh:
# the services run it on ONNX Runtime and never import torch.
RUN python -m shared.runtime.onnx_export

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin mesh \
    && mkdir -p /var/lib/mesh && chown mesh /var/lib/mesh
# state that must outlive a container: the dev encryption key (set MEMORY_ENCRYPTION_KEY in production), mem0's history
VOLUME /var/lib/mesh
USER mesh

CMD ["python", "-m", "mesh", "--help"]
