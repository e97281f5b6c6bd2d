"""Safe file output for semask (arXiv 2112.12782): output planning, atomic writes, stale-temp clean-up, write errors.

`outputs` checks a command's outputs before it does any work; `writes` writes each file atomically and durably.
"""
from semask.io.outputs import (Inputs, PathLike, check_output_file, check_output_files, check_output_folder,
                               plan_outputs)
from semask.io.writes import (atomic_path, fsync_directory, fsync_file, process_alive, remove_stale_temp_files,
                              write_error)

__all__ = ['process_alive', 'fsync_directory', 'fsync_file', 'remove_stale_temp_files', 'check_output_file',
           'check_output_files', 'check_output_folder', 'atomic_path', 'plan_outputs', 'write_error',
           'PathLike', 'Inputs']
