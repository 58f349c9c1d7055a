"""The figures stage (``06_figures``): the seed papers' figures from the pipeline's outputs.

``plots`` holds one pure function per figure (a tidy DataFrame in, a matplotlib Figure out);
``stage`` reads the stage outputs, writes each figure as PNG/SVG beside the CSV it is drawn from.
"""
