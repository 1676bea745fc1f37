#!/bin/sh
# Final layer of both Docker targets: install our packages (dependencies are the layer below),
# add the unprivileged user, and build the built-in tiny models into the image (the demo model
# ships inside the workers package).
set -eu
pip install --no-deps .
useradd --system --uid 10001 --home-dir /home/imagegen --create-home imagegen
mkdir -p /models /opt/imagegen/builtin
python -c "from workers.models import BUILTIN_MODELS, resolve_model_path
for name in BUILTIN_MODELS:
    resolve_model_path(name, '/opt/imagegen/builtin')"
chown -R 10001 /models
