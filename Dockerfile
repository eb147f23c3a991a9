# lorastream's workers (scorer and trainer) in one image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY schemas ./schemas
COPY streams ./streams
COPY trainer ./trainer
COPY lorastream ./lorastream
RUN pip install --no-cache-dir -c constraints.txt .
ENV LORASTREAM_HOME=/data LORASTREAM_ADAPTER_DIR=/data/adapters HF_HUB_OFFLINE=1
VOLUME ["/data"]
ENTRYPOINT ["lorastream"]
