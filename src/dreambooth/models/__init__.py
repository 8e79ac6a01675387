"""Models as the user names them: `base` says what a model argument is and names a model by its weights
(torch-free); `loading` makes a pipeline of it; `tiny` builds random-weight models offline."""
