# Every process that runs a stage imports this package first (the CLI, a worker's flow run, the training
# child): drop the library warnings its user cannot act on before the libraries load.
from qlora_flow.console import quiet_library_noise

quiet_library_noise()
