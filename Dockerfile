# The gateway image. `python -m intelligence` runs the chat API from the same image.
# Both listen on :: — every address of both families on one dual-stack socket — so the image
# serves on IPv4-only, dual-stack and IPv6-only networks alike.
# Python 3.11, not a newer one: on the proxy's hot path 3.12 and 3.13 execute about 16% more
# instructions per request (bench/instructions.py: 524k on 3.11, 607k on 3.12, 612k on 3.13) and
# 3.12 used 18% more CPU per request in an interleaved wrk A/B. 3.11 has security support until
# October 2027; measure again before then, or when a newer interpreter is released.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_HOST=:: \
    INTELLIGENCE_HOST=::

WORKDIR /app

# Dependencies first: this layer is rebuilt only when setup.cfg changes. Its build leaves the empty
# placeholder __init__.py files in build/lib, newer than the real ones COPY brings in with their
# own mtimes, so setuptools would skip copying those and install the empty ones: build/ goes too.
COPY pyproject.toml setup.cfg README.md ./
RUN mkdir gateway intelligence migrations \
    && touch gateway/__init__.py intelligence/__init__.py \
    && pip install . \
    && pip uninstall -y k8s-platform-gateway \
    && rm -rf gateway intelligence build k8s_platform_gateway.egg-info

COPY gateway ./gateway
COPY intelligence ./intelligence
COPY migrations ./migrations
RUN pip install --no-deps . \
    && rm -rf build k8s_platform_gateway.egg-info \
    && useradd --system --uid 10001 --no-create-home gateway

USER 10001
EXPOSE 8080 8081
CMD ["python", "-m", "gateway"]
