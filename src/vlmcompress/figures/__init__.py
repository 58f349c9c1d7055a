"""Every figure of the project, and the figures stage (``06_figures``) that draws the papers' set.

One module per figure family, each a ``*_data`` function (the tidy table a figure is drawn
from) and a drawing function (that table in, a matplotlib Figure out): ``codec`` (rate vs
accuracy, BD-rate, ablation, reconstructions, codec training curves), ``tokens`` (accuracy vs
tokens and vs prefill cost, token maps), ``lvlm`` (training curves, accuracy table),
``dataset`` (sample images), ``photos`` (rate-distortion on photographs). ``plots`` holds what
they share (styling, colours, labels, saving); ``stage`` reads the stage outputs and writes
each figure as PNG/SVG beside the CSV it is drawn from.
"""
