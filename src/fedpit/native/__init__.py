"""Small C kernels compiled at first use with the system compiler, each with a pure-torch fallback."""
