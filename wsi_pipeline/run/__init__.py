"""Running slides: a folder of slides (batch), one slide (pipeline), cluster jobs, run records and outputs."""
