"""A head from a photo or a video (docs/capture.md): decoding (media), 2D face landmarks (landmarks), the
landmark-to-template correspondence (correspondence), the model's surface through root finding with implicit
differentiation (surface), the fit (fit) and the op the server and the CLI share (op). No Blender here."""
