"""Start the web UI: `python launch.py [--port N] [--listen --auth user:pw] [--models-dir D] [--outputs-dir D]`.

launch.py makes the environment and calls main(argv). Binding beyond localhost needs a password: the app can
start processes and write files, so an open --listen without --auth is refused.
"""
from __future__ import annotations

import argparse
import logging
import sys

import gradio as gr

from app.folders import Folders
from app.gallery_tab import build_gallery_tab
from app.jobs import Jobs
from app.run_queue import RunQueue
from app.train_tab import build_train_tab
from trainer.config import PROJECT_ROOT
from trainer.generate import Generator

CSS = """
/* the run on screen (status, loss, samples) stays in view while the dataset and settings scroll beside it;
   Gradio's container hides overflow, which makes it a scroll container and stops `sticky`: clip does not */
.gradio-container { overflow: clip !important; }
#train-panel { position: sticky; top: 8px; align-self: flex-start; max-height: calc(100vh - 16px); flex-wrap: nowrap;
               overflow-y: auto; }
.caption-card img { object-fit: cover; }
#train-status-text progress { height: 14px; margin-top: 6px; }
#sample-legend { font-size: 0.85em; opacity: 0.8; }
/* a sample's caption ("step 200 · #1") may use the thumbnail's whole width */
#samples .caption-label, #base-latest .caption-label { max-width: 100%; }
/* small pictures (the demo model's are 64 px) fill the box instead of sitting in its middle at their own size */
#gen-image img { width: 100%; height: 100%; object-fit: contain; }
#sweep-image .image-frame, #sweep-image img { width: 100%; height: auto; object-fit: contain !important; }
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description="LoRA Studio: train and try Stable Diffusion LoRAs.")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true", help="bind all interfaces (0.0.0.0); requires --auth")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (needed with --listen)")
    p.add_argument("--models-dir", default=str(PROJECT_ROOT / "models"),
                   help="a models folder: ours, or an existing AUTOMATIC1111/ComfyUI one "
                        "(checkpoints in Stable-diffusion/, LoRAs in Lora/ or loras/)")
    p.add_argument("--outputs-dir", default=str(PROJECT_ROOT / "outputs"),
                   help="where uploaded datasets, training runs and generated images go")
    args = p.parse_args(argv)
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            p.error("--auth must be USER:PASSWORD, e.g. --auth alice:s3cret")
        args.auth = (user, password)
    if args.listen and args.auth is None:
        p.error("--listen makes the app reachable from other machines, and it can start processes and write "
                "files: add --auth USER:PASSWORD (e.g. --listen --auth alice:s3cret), or drop --listen to stay "
                "on 127.0.0.1")
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a port number (1-65535)")
    return args


def build_app(folders: Folders) -> gr.Blocks:
    jobs = Jobs(folders.runs_dir)
    queue = RunQueue(jobs)
    queue.run_in_background()  # the queue lives in the app, not in a page: closing the browser keeps it going
    generator = Generator(lora_dirs=[folders.lora_dir])  # one cached base pipeline for the app's lifetime
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio")
        with gr.Tab("Train", id="train"):
            build_train_tab(demo, folders, jobs, queue)
        with gr.Tab("Gallery", id="gallery") as gallery:
            build_gallery_tab(demo, gallery, folders, generator)
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    folders = Folders.create(args.models_dir, args.outputs_dir)
    demo = build_app(folders)
    demo.queue(default_concurrency_limit=4)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    print(f"LoRA Studio: models in {folders.models_dir}, outputs in {folders.outputs_dir}", flush=True)
    try:
        demo.launch(server_name=host, server_port=args.port, auth=args.auth, allowed_paths=folders.served(),
                    show_error=True, inbrowser=False, css=CSS, footer_links=[])
    except OSError as e:  # almost always: the port is taken (another copy of the app is running)
        sys.exit(f"Cannot serve on {host}:{args.port} ({e}). Is the app already running? "
                 f"Open it, or start this one with another port, e.g. --port {args.port + 1}")


if __name__ == "__main__":
    main(sys.argv[1:])
