"""`optimum-cli sparse prune | eval | export | ...`: optimum-sparse's commands inside optimum's CLI.

optimum-cli imports every module of the `optimum.commands.register` namespace (PEP 420: no
`__init__.py` here or above) at each start and registers the commands in its `REGISTER_COMMANDS`.
Importing `optimum_sparse` loads torch and transformers (seconds), so this module and the parser it
adds import neither: `sparse` takes the rest of the command line as it is, and `run()` hands it to
`optimum_sparse.cli`'s own parser and runner. The commands, flags, output and exit codes are therefore
those of `optimum-sparse`, including any command or flag added there later.
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

PROG = "optimum-cli sparse"


class SparseCommand(BaseOptimumCLICommand):
    """`optimum-cli sparse COMMAND [FLAGS]` runs `optimum-sparse COMMAND [FLAGS]`."""

    COMMAND = CommandInfo(name="sparse", help="prune, evaluate and export sparse LLMs (optimum-sparse)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        # -h/--help is passed on too, so that it lists optimum-sparse's commands (a group that resolves the
        # clash with the parser's own -h replaces it)
        passed_on = parser.add_argument_group("optimum-sparse", conflict_handler="resolve")
        passed_on.add_argument("-h", "--help", action="store_true", help="show optimum-sparse's help and exit")
        passed_on.add_argument(
            "arguments",
            nargs=argparse.REMAINDER,
            metavar="COMMAND ...",
            help="an optimum-sparse command (prune, eval, export, ...) and its flags",
        )

    def run(self) -> None:
        from optimum_sparse.cli import main

        argv = list(self.args.arguments) + (["--help"] if self.args.help else [])
        code = main(argv, prog=PROG)
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [SparseCommand]
