"""Fail when the contracts in protos/ break compatibility with a previous commit (default HEAD~1).

Runs `buf breaking protos --against '<git dir>#ref=<sha>,subdir=protos'` with the rules of
protos/buf.yaml. The ref is resolved to a full sha here, so it also works on a detached HEAD
(CI merge commits) and from a linked worktree.

Outcomes (exit code):
  0  compatible, or skipped with a message: the repository has no commit `--against` (the
     first commit), or that commit has no protos/buf.yaml yet (contracts not yet guarded).
  1  breaking changes; buf lists them.
  2  the check cannot run: no buf, not a git repository, or a shallow clone that lacks the
     commit. A CI checkout needs the history: `fetch-depth: 0` (or at least 2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUF = REPO / "tools" / "node_modules" / ".bin" / "buf"
PROTO_DIR = "protos"


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def resolve_commit(repo: Path, ref: str) -> str | None:
    """The full sha of ref, or None when the repository has no such commit."""
    result = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return result.stdout.strip() if result.returncode == 0 else None


def check(repo: Path, against: str, buf: Path) -> int:
    if git(repo, "rev-parse", "--git-dir").returncode != 0:
        print(f"buf breaking: {repo} is not a git repository", file=sys.stderr)
        return 2
    if not buf.exists():
        print(f"buf breaking: {buf} not found; run `make install`", file=sys.stderr)
        return 2
    sha = resolve_commit(repo, against)
    if sha is None:
        if git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
            print(
                f"buf breaking: {against} is not in this shallow clone; fetch the history "
                "(CI: actions/checkout with fetch-depth: 0)",
                file=sys.stderr,
            )
            return 2
        print(f"buf breaking: skipped, there is no commit {against} to compare with")
        return 0
    if git(repo, "cat-file", "-e", f"{sha}:{PROTO_DIR}/buf.yaml").returncode != 0:
        print(f"buf breaking: skipped, {against} ({sha[:12]}) has no {PROTO_DIR}/buf.yaml")
        return 0
    # The common git dir holds every object, also when this is a linked worktree whose .git
    # is a file that buf cannot read.
    git_dir = Path(git(repo, "rev-parse", "--git-common-dir").stdout.strip())
    if not git_dir.is_absolute():
        git_dir = repo / git_dir
    against_input = f"{git_dir.resolve()}#ref={sha},subdir={PROTO_DIR}"
    result = subprocess.run([str(buf), "breaking", PROTO_DIR, "--against", against_input], cwd=repo)
    if result.returncode != 0:
        print(
            f"buf breaking: {PROTO_DIR}/ breaks compatibility with {against} ({sha[:12]}); "
            "add a new field/RPC or a new package version (v2) instead",
            file=sys.stderr,
        )
        return 1
    print(f"buf breaking: {PROTO_DIR}/ is compatible with {against} ({sha[:12]})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="git work tree holding protos/")
    parser.add_argument(
        "--against",
        default="HEAD~1",
        help="commit to compare with (default HEAD~1; before committing use HEAD, "
        "for a pull request origin/main)",
    )
    parser.add_argument("--buf", type=Path, default=DEFAULT_BUF, help="buf executable")
    args = parser.parse_args()
    return check(args.repo.resolve(), args.against, args.buf)


if __name__ == "__main__":
    sys.exit(main())
