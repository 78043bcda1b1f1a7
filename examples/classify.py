"""An application on the device: classify an image with the model the agent serves.

    python examples/classify.py photo.jpg [--socket /var/lib/edgefleet/infer.sock]

It asks the agent what the model takes (``GET /v1/model``: its input, the preprocessing spec the model was trained
with, the class names), prepares the image exactly so with ``device_agent.preprocess``, and prints the top classes
with the version that answered. Needs Pillow for decoding the image; nothing else beyond the agent's own packages.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from device_agent.client import Client, InferenceError
from device_agent.preprocess import Preprocess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--socket", default="/var/lib/edgefleet/infer.sock", help="the agent's serve.socket")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    from PIL import Image

    with Client(args.socket, timeout=10) as client:
        model = client.model()
        spec = Preprocess.from_dict(model["preprocess"], "the model's preprocess") if model.get("preprocess") \
            else Preprocess()
        [inp] = model["inputs"]
        image = np.asarray(Image.open(args.image).convert("L" if spec.channels == 1 else "RGB"))
        x = spec.apply(image)[None].astype(np.float32)
        try:
            answer = client.infer({inp["name"]: x})
        except InferenceError as exc:  # 400: the image does not fit what the model takes, and why
            print(f"the agent refused the image: {exc}", file=sys.stderr)
            return 1
    scores = next(iter(answer.outputs.values()))[0]
    labels = model.get("labels") or [str(i) for i in range(len(scores))]
    for i in np.argsort(scores)[::-1][:args.top]:
        print(f"{labels[i]:>20s}  {scores[i]:8.3f}")
    print(f"(model {model['name']} v{answer.version}, request {answer.id}, {answer.latency_ms:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
