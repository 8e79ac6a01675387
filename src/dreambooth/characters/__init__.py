"""Characters for an application: a character file (`character`), the state a language model or a program sets
(`state`), the vocabulary that turns a state into words (`vocabulary.yaml`), and the pure prompt compiler
(`compiler`) that makes a render request of them."""
