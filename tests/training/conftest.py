from tests.training.common import dataset_dir, one_thread  # noqa: F401 (fixtures for every module here)
