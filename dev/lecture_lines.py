"""
How much of train_gpt2.py a learner must read to follow a run: the statements a tiny --mode
pretrain (val loss, samples, checkpoints), its --init_from resume and a --mode sample execute
(traced with sys.settrace, each counted once at its first line, as coverage.py counts them), and
how many of them lie in the lecture (before the APPENDIX banner) and in the file's first 800
lines. Also the file's size and its share of lines that carry a comment.

    python dev/lecture_lines.py path/to/any.txt
"""

import ast
import io
import os
import sys
import tempfile
import tokenize

HERE = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, HERE)
import prepare_data  # noqa: E402
import train_gpt2  # noqa: E402

TINY = [
    "--n_layer",
    "2",
    "--n_head",
    "2",
    "--n_embd",
    "32",
    "--block_size",
    "32",
    "--batch_size",
    "2",
    "--total_batch_size",
    "256",
    "--device",
    "cpu",
    "--eval_interval",
    "2",
    "--val_steps",
    "2",
    "--eval_samples",
    "1",
    "--ckpt_interval",
    "2",
    "--warmup_steps",
    "1",
]


def main(text_file):
    path = os.path.realpath(train_gpt2.__file__)
    executed = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != path:
            return None  # no line events for other files' frames
        if event == "line":
            executed.add(frame.f_lineno)
        return tracer

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data.main(["--files", text_file, "--out_dir", f"{tmp}/data", "--num_proc", "1"])
        run = ["--mode", "pretrain", "--data_dir", f"{tmp}/data", "--out_dir", f"{tmp}/run", *TINY]
        sys.settrace(tracer)
        try:
            train_gpt2.main(run + ["--max_steps", "4"])
            train_gpt2.main(run + ["--init_from", "resume", "--max_steps", "6"])
            train_gpt2.main(
                [
                    "--mode",
                    "sample",
                    "--init_from",
                    f"{tmp}/run",
                    "--max_new_tokens",
                    "8",
                    "--device",
                    "cpu",
                ]
            )
        finally:
            sys.settrace(None)
    source = open(path).read()
    lines = source.splitlines()
    first = {}  # line -> the first line of the innermost statement holding it
    for node in sorted(
        (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.stmt)),
        key=lambda n: n.end_lineno - n.lineno,
        reverse=True,
    ):  # the innermost last, so it wins
        first.update({line: node.lineno for line in range(node.lineno, node.end_lineno + 1)})
    executed = {first[line] for line in executed if line in first}
    appendix = next(i for i, line in enumerate(lines, 1) if line.startswith("# APPENDIX"))
    comments = {
        t.start[0]
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    share = lambda lines_: 100 * len(lines_) / len(executed)  # noqa: E731
    print(
        f"train_gpt2.py: {len(lines)} lines, {100 * len(comments) / len(lines):.1f}% carry a comment; "
        f"the lecture is lines 1-{appendix - 1}"
    )
    print(
        f"a tiny pretrain, its resume and a sample execute {len(executed)} statements: "
        f"{share([n for n in executed if n <= 800]):.1f}% in the first 800, "
        f"{share([n for n in executed if n < appendix]):.1f}% in the lecture"
    )


if __name__ == "__main__":
    main(sys.argv[1])
