import pytest

from bench import data


@pytest.fixture(scope="session")
def mnist_data():
    return data.load()
