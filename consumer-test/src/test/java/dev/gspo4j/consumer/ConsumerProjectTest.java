package dev.gspo4j.consumer;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.lang.module.ModuleFinder;
import java.lang.module.ModuleReference;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Stream;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * gspo4j as a new user meets it: a separate Maven project whose only dependencies are README's
 * snippet, built against the artifacts this build made, runs README's quick-start.
 *
 * <p>The artifacts are installed (Maven's local-repository layout) into a private repository under
 * {@code target/consumer-repo}, which the consumer's Maven uses as its local repository, so
 * nothing of gspo4j reaches {@code ~/.m2}. Third-party artifacts (the presets, Maven's plugins)
 * come from {@code ~/.m2} through a {@code file://} mirror: no network.
 */
class ConsumerProjectTest {
    private static final Path ROOT = Path.of(System.getProperty("gspo4j.root")).toAbsolutePath().normalize();
    private static final String VERSION = System.getProperty("gspo4j.version");
    private static final Path CONSUMER = Path.of(System.getProperty("gspo4j.consumer.dir"));
    private static final Path REPO = Path.of(System.getProperty("gspo4j.consumer.repo"));
    private static final Path GPU_JAR = ROOT.resolve("java/target/gspo4j-" + VERSION + "-linux-x86_64-gpu.jar");

    @BeforeAll
    static void installAndWriteTheProject() throws IOException {
        deleteRecursively(REPO);
        deleteRecursively(CONSUMER);
        install("gspo4j-parent", ROOT.resolve("pom.xml"), null, null);
        install("gspo4j", ROOT.resolve("java/pom.xml"), ROOT.resolve("java/target/gspo4j-" + VERSION + ".jar"), null);
        install("gspo4j", null, ROOT.resolve("java/target/gspo4j-" + VERSION + "-linux-x86_64.jar"), "linux-x86_64");
        if (Files.exists(GPU_JAR)) {
            install("gspo4j", null, GPU_JAR, "linux-x86_64-gpu");
        }
        install("gspo4j-platform", ROOT.resolve("platform/pom.xml"),
                ROOT.resolve("platform/target/gspo4j-platform-" + VERSION + ".jar"), null);

        // The project: README's snippet as its dependencies; plugin versions pinned to those of
        // gspo4j's build (in ~/.m2 already), which a user's project would choose for itself.
        final String snippet = readmeBlock("cpu dependencies");
        final String gpuNatives = "<dependency><groupId>dev.gspo4j</groupId><artifactId>gspo4j</artifactId><version>" + VERSION
                + "</version><classifier>linux-x86_64-gpu</classifier></dependency>";
        Files.createDirectories(CONSUMER.resolve("src/main/java/consumer"));
        Files.writeString(CONSUMER.resolve("pom.xml"), """
                <?xml version="1.0" encoding="UTF-8"?>
                <project xmlns="http://maven.apache.org/POM/4.0.0">
                  <modelVersion>4.0.0</modelVersion>
                  <groupId>consumer</groupId>
                  <artifactId>consumer</artifactId>
                  <version>1</version>
                  <properties>
                    <maven.compiler.release>17</maven.compiler.release>
                    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
                  </properties>
                  <dependencies>
                %s
                  </dependencies>
                  <profiles>
                    <profile><id>gpu-natives</id><dependencies>%s</dependencies></profile>
                  </profiles>
                  <build>
                    <plugins>
                      <plugin><artifactId>maven-resources-plugin</artifactId><version>3.3.1</version></plugin>
                      <plugin><artifactId>maven-compiler-plugin</artifactId><version>3.13.0</version></plugin>
                      <plugin>
                        <groupId>org.codehaus.mojo</groupId><artifactId>exec-maven-plugin</artifactId><version>3.5.0</version>
                        <configuration>
                          <executable>java</executable>
                          <arguments><argument>-classpath</argument><classpath/><argument>consumer.QuickStart</argument></arguments>
                        </configuration>
                      </plugin>
                    </plugins>
                  </build>
                </project>
                """.formatted(snippet, gpuNatives));
        Files.writeString(CONSUMER.resolve("src/main/java/consumer/QuickStart.java"), """
                package consumer;

                import dev.gspo4j.*;
                import org.bytedeco.pytorch.*;
                import org.bytedeco.pytorch.global.torch;
                import org.bytedeco.pytorch.global.torch.ScalarType;

                public class QuickStart {
                    public static void main(String[] args) {
                %s
                        System.out.println("info: " + Gspo4j.info());
                    }
                }
                """.formatted(readmeQuickStart()));
        final String local = System.getProperty("gspo4j.maven.localRepository");
        Files.writeString(CONSUMER.resolve("settings.xml"), """
                <settings>
                  <mirrors>
                    <mirror><id>home-m2</id><mirrorOf>*</mirrorOf><url>%s</url></mirror>
                  </mirrors>
                </settings>
                """.formatted(Path.of(local).toUri()));
    }

    @Test
    void readmesSnippetRunsTheQuickStartOnTheCpuNatives() throws Exception {
        final String output = consumerMaven("compile", "exec:exec");
        assertTrue(output.contains("loss "), "the quick-start printed no loss:\n" + output);
        assertTrue(output.contains("info: gspo4j " + VERSION + " linux-x86_64, "), "Gspo4j.info():\n" + output);
    }

    @Test
    void theGpuNativesLoadFirstAndRunTheCpuPath() throws Exception {
        if (!Files.exists(GPU_JAR)) {
            System.out.println("ConsumerProjectTest: no " + GPU_JAR.getFileName() + " (built without CUDA): GPU natives not run");
            return;
        }
        final String output = consumerMaven("-Pgpu-natives", "compile", "exec:exec");
        assertTrue(output.contains("loss "), "the quick-start printed no loss:\n" + output);
        assertTrue(output.contains("info: gspo4j " + VERSION + " linux-x86_64-gpu, "), "Gspo4j.info():\n" + output);
        assertTrue(output.matches("(?s).*linux-x86_64-gpu, CPU [a-z0-9]+, CUDA [0-9]+\\.[0-9].*"), "CUDA kernels:\n" + output);
    }

    /** The GPU snippet names gspo4j's installed artifacts and the presets' versions gspo4j builds with. */
    @Test
    void theGpuSnippetMatchesTheBuild() throws IOException {
        final String snippet = readmeBlock("gpu dependencies");
        final String parent = Files.readString(ROOT.resolve("pom.xml"));
        final String javacpp = property(parent, "javacpp.version");
        final Map<String, String> expected = new TreeMap<>(Map.of(
                "dev.gspo4j:gspo4j", VERSION,
                "org.bytedeco:pytorch", property(parent, "pytorch.version").replace("${javacpp.version}", javacpp),
                "org.bytedeco:openblas", property(parent, "openblas.version").replace("${javacpp.version}", javacpp),
                "org.bytedeco:javacpp", javacpp,
                // The version of org.bytedeco:cuda that the presets' PyTorch POM names (optional there).
                "org.bytedeco:cuda", "13.1-9.19-" + javacpp));
        final Matcher dependency = Pattern.compile("<groupId>(.*?)</groupId>\\s*<artifactId>(.*?)</artifactId>\\s*<version>(.*?)</version>"
                + "(?:\\s*<classifier>(.*?)</classifier>)?").matcher(snippet);
        final List<String> coordinates = new ArrayList<>();
        while (dependency.find()) {
            final String key = dependency.group(1) + ":" + dependency.group(2);
            assertEquals(expected.get(key), dependency.group(3), key + "'s version in README's GPU snippet");
            coordinates.add(key + (dependency.group(4) == null ? "" : ":" + dependency.group(4)));
        }
        assertEquals(List.of("dev.gspo4j:gspo4j", "dev.gspo4j:gspo4j:linux-x86_64-gpu", "org.bytedeco:pytorch:linux-x86_64-gpu",
                "org.bytedeco:cuda", "org.bytedeco:cuda:linux-x86_64", "org.bytedeco:cuda:linux-x86_64-redist",
                "org.bytedeco:openblas:linux-x86_64", "org.bytedeco:javacpp:linux-x86_64"), coordinates);
    }

    /** Each jar has its own module name (two jars named alike make JPMS refuse both). */
    @Test
    void everyJarHasItsOwnModuleName() throws IOException {
        final Map<String, String> names = new TreeMap<>();
        final List<Path> jars = new ArrayList<>(List.of(ROOT.resolve("java/target/gspo4j-" + VERSION + ".jar"),
                ROOT.resolve("java/target/gspo4j-" + VERSION + "-linux-x86_64.jar"),
                ROOT.resolve("platform/target/gspo4j-platform-" + VERSION + ".jar")));
        if (Files.exists(GPU_JAR)) {
            jars.add(GPU_JAR);
        }
        for (Path jar : jars) {
            final List<String> modules = ModuleFinder.of(jar).findAll().stream().map(ModuleReference::descriptor)
                    .map(d -> d.name()).toList();
            assertEquals(1, modules.size(), jar.toString());
            assertFalse(names.containsKey(modules.get(0)), modules.get(0) + " twice: " + names.get(modules.get(0)) + " and " + jar);
            names.put(modules.get(0), jar.getFileName().toString());
        }
        assertTrue(names.keySet().containsAll(List.of("dev.gspo4j", "dev.gspo4j.linux.x86_64", "dev.gspo4j.platform")), names.toString());
    }

    private static String consumerMaven(String... goals) throws Exception {
        final List<String> command = new ArrayList<>(List.of(Path.of(System.getProperty("gspo4j.maven.home"), "bin", "mvn").toString(),
                "-B", "-q", "-s", CONSUMER.resolve("settings.xml").toString(), "-Dmaven.repo.local=" + REPO,
                "-f", CONSUMER.resolve("pom.xml").toString()));
        command.addAll(List.of(goals));
        final Process process = new ProcessBuilder(command).redirectErrorStream(true).start();
        final byte[] bytes = process.getInputStream().readAllBytes();
        assertTrue(process.waitFor(10, TimeUnit.MINUTES), "the consumer's build did not finish in 10 minutes");
        final String output = new String(bytes, StandardCharsets.UTF_8);
        assertEquals(0, process.exitValue(), "the consumer's build failed:\n" + output);
        output.lines().filter(l -> l.startsWith("info: ") || l.startsWith("loss ")).forEach(l -> System.out.println("consumer: " + l));
        return output;
    }

    /** Lays an artifact out as {@code mvn install} does (POM beside the jar, no SNAPSHOT timestamps). */
    private static void install(String artifact, Path pom, Path jar, String classifier) throws IOException {
        final Path dir = REPO.resolve("dev/gspo4j").resolve(artifact).resolve(VERSION);
        Files.createDirectories(dir);
        if (pom != null) {
            Files.copy(pom, dir.resolve(artifact + "-" + VERSION + ".pom"), StandardCopyOption.REPLACE_EXISTING);
        }
        if (jar != null) {
            assertTrue(Files.exists(jar), jar + " is missing: run mvn verify, which packages it before this test");
            Files.copy(jar, dir.resolve(artifact + "-" + VERSION + (classifier == null ? "" : "-" + classifier) + ".jar"),
                    StandardCopyOption.REPLACE_EXISTING);
        }
    }

    private static String readmeBlock(String name) throws IOException {
        final String readme = Files.readString(ROOT.resolve("README.md"));
        final Matcher block = Pattern.compile("<!-- " + name + " begin -->\\s*```xml\\n(.*?)```\\s*<!-- " + name + " end -->",
                Pattern.DOTALL).matcher(readme);
        assertTrue(block.find(), "README.md has no '" + name + "' block");
        return block.group(1);
    }

    private static String readmeQuickStart() throws IOException {
        final String readme = Files.readString(ROOT.resolve("README.md"));
        final Matcher block = Pattern.compile("## Quick start.*?```java\\n(.*?)```", Pattern.DOTALL).matcher(readme);
        assertTrue(block.find(), "README.md has no Quick start java block");
        return block.group(1);
    }

    private static String property(String pom, String name) {
        final Matcher m = Pattern.compile("<" + Pattern.quote(name) + ">(.*?)</" + Pattern.quote(name) + ">").matcher(pom);
        assertTrue(m.find(), name);
        return m.group(1);
    }

    private static void deleteRecursively(Path path) throws IOException {
        if (!Files.exists(path)) {
            return;
        }
        try (Stream<Path> walk = Files.walk(path)) {
            for (Path p : walk.sorted((a, b) -> b.compareTo(a)).toList()) {
                Files.delete(p);
            }
        }
    }
}
